"""PNG plots from a run's metrics.jsonl: loss curves and per-layer expert load heatmaps."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # Figure renders with Agg by itself: no pyplot, no display, no global state

from moetrain.train.metrics import read_metrics


def _latest_per_step(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Records of one type sorted by step; a step logged twice (a resumed run) keeps its last record."""
    by_step = {record["step"]: record for record in records if record.get("type") == kind}
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _plot_loss(train: list[dict], evals: list[dict], path: str) -> None:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for key, label in (("loss", "train loss (with aux)"), ("lm_loss", "train LM loss")):
        steps, values = _series(train, key)
        if steps:
            ax.plot(steps, values, label=label, linewidth=1.2)
    steps, values = _series(evals, "eval_loss")
    if steps:
        ax.plot(steps, values, "o", label="eval loss", markersize=5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _expert_load_by_layer(train: list[dict]) -> dict[int, tuple[list[int], np.ndarray]]:
    """layer -> (steps, array[experts, steps] of the fraction of that layer's tokens per expert)."""
    columns: dict[int, list[tuple[int, list[float]]]] = {}
    for record in train:
        for layer in record.get("moe_layers") or []:
            counts = np.asarray(layer["tokens_per_expert"], dtype=np.float64)
            total = counts.sum()
            fractions = counts / total if total > 0 else np.zeros_like(counts)
            columns.setdefault(layer["layer"], []).append((record["step"], fractions))
    loads = {}
    for layer, layer_columns in sorted(columns.items()):
        num_experts = max(len(fractions) for _, fractions in layer_columns)
        grid = np.full((num_experts, len(layer_columns)), np.nan)
        for column, (_, fractions) in enumerate(layer_columns):
            grid[: len(fractions), column] = fractions
        loads[layer] = ([step for step, _ in layer_columns], grid)
    return loads


def _cell_edges(steps: list[int]) -> np.ndarray:
    """Boundaries halfway between logged steps, so each column is centred on its step."""
    centers = np.asarray(steps, dtype=np.float64)
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mids = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mids[0]], mids, [2 * centers[-1] - mids[-1]]])


def _plot_expert_load(loads: dict[int, tuple[list[int], np.ndarray]], path: str) -> None:
    heights = [max(1.6, 0.18 * grid.shape[0]) for _, grid in loads.values()]
    fig = Figure(figsize=(9, sum(heights) + 0.8))
    axes = fig.subplots(len(loads), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax, (layer, (steps, grid)) in zip(axes[:, 0], loads.items()):
        mesh = ax.pcolormesh(_cell_edges(steps), np.arange(grid.shape[0] + 1) - 0.5, grid,
                             cmap="viridis", vmin=0.0, shading="flat")
        ax.set_ylabel("expert")
        ax.set_title(f"MoE layer {layer}: fraction of tokens per expert ({grid.shape[0]} experts, "
                     f"uniform = {1 / grid.shape[0]:.3f})", fontsize=9)
        ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(mesh, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


HEALTH_PANELS = (("router_entropy", "routing entropy / log(E)"),
                 ("max_over_mean", "busiest expert / uniform share"),
                 ("dead_experts", "dead experts"))


def _plot_expert_health(train: list[dict], path: str) -> bool:
    """One panel per health signal (expert-health alarms), a line per MoE layer, alarm firings marked;
    False (nothing written) when the records carry none of them."""
    layers = sorted({layer["layer"] for record in train for layer in record.get("moe_layers") or []})
    fig = Figure(figsize=(8, 7))
    axes = fig.subplots(len(HEALTH_PANELS), 1, sharex=True)
    drawn = False
    for ax, (key, label) in zip(axes, HEALTH_PANELS):
        for index in layers:
            points = [(record["step"], layer) for record in train for layer in record.get("moe_layers") or []
                      if layer["layer"] == index and layer.get(key) is not None]
            if not points:
                continue
            drawn = drawn or key != "max_over_mean"
            line, = ax.plot([step for step, _ in points], [layer[key] for _, layer in points], linewidth=1.2,
                            label=f"layer {index}")
            alarmed = [(step, layer[key]) for step, layer in points
                       if any(layer.get(alarm) for alarm in ("dead_experts", "collapsed", "low_entropy"))]
            if alarmed:
                ax.plot(*zip(*alarmed), "x", color=line.get_color(), markersize=6)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    if not drawn:
        return False
    axes[0].legend(fontsize=7)
    axes[0].set_title("expert health (x: an alarm is on)", fontsize=9)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def expert_load_png(train: list[dict], path: str) -> None:
    """The expert-load heatmap of these train records (at least one, of an MoE run) as a PNG at `path`."""
    _plot_expert_load(_expert_load_by_layer(train), path)


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Write loss.png and (for MoE runs) expert_load.png and expert_health.png into ``out_dir``; return the
    paths written."""
    records = read_metrics(metrics_path)
    train, evals = _latest_per_step(records, "train"), _latest_per_step(records, "eval")
    if not train and not evals:
        raise ValueError(f"{metrics_path} has no train or eval records yet; plot after the first log interval")
    os.makedirs(out_dir, exist_ok=True)
    loss_path = os.path.join(out_dir, "loss.png")
    _plot_loss(train, evals, loss_path)
    written = [loss_path]
    loads = _expert_load_by_layer(train)
    if loads:
        load_path = os.path.join(out_dir, "expert_load.png")
        _plot_expert_load(loads, load_path)
        written.append(load_path)
        health_path = os.path.join(out_dir, "expert_health.png")
        if _plot_expert_health(train, health_path):
            written.append(health_path)
    return written
