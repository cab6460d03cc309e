"""Held-out perplexity and zero-shot task metrics of a model, and the table that compares models
(`moetrain eval`, in moetrain/cli/eval.py, runs them over checkpoints)."""

from __future__ import annotations

import math
from typing import Any

from moetrain.evaluation.scorer import LMScorer
from moetrain.evaluation.tasks import HEADLINE_METRIC, Task, evaluate_task


def perplexity(scorer: LMScorer, texts: list[str]) -> dict[str, float]:
    """Per-token perplexity of held-out documents (each scored on its own), and bits per byte."""
    scorer.drop_fraction(reset=True)
    scores = scorer.loglikelihood_rolling(texts)
    logprob, tokens = sum(s.logprob for s in scores), sum(s.num_tokens for s in scores)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {"documents": len(texts), "tokens": tokens, "loss": -logprob / tokens,
            "ppl": math.exp(min(-logprob / tokens, 50.0)), "bits_per_byte": -logprob / num_bytes / math.log(2),
            "drop_fraction": scorer.drop_fraction()}


def evaluate_model(scorer: LMScorer, tasks: list[Task], ppl_texts: list[str] | None = None,
                   max_new_tokens: int = 32) -> dict[str, Any]:
    """Parameter counts, perplexity (when texts are given) and every task's metrics for the scorer's model."""
    counts = scorer.model.parameter_counts()
    result: dict[str, Any] = {"params_total": counts["total"], "params_active": counts["active"]}
    if ppl_texts:
        result["perplexity"] = perplexity(scorer, ppl_texts)
    result["tasks"] = {task.name: evaluate_task(task, scorer, max_new_tokens) for task in tasks}
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: a row per model, a column per task's headline metric (and held-out ppl if measured)."""
    first = next(iter(results.values()))
    tasks = [(name, HEADLINE_METRIC[task["kind"]]) for name, task in first["tasks"].items()]
    header = ["model", "params (total / active)"] + (["held-out ppl"] if "perplexity" in first else [])
    header += [f"{name} {'EM' if metric == 'exact_match' else metric}" for name, metric in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in results.items():
        row = [label, f"{result['params_total'] / 1e6:.2f}M / {result['params_active'] / 1e6:.2f}M"]
        if "perplexity" in first:
            row.append(f"{result['perplexity']['ppl']:.2f}")
        row += [f"{result['tasks'][name][metric]:.3f}" for name, metric in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
