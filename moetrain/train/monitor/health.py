"""Expert-health alarms per MoE layer: dead experts, router collapse, a router too sure of itself.

They read the routing summaries the trainer logs anyway (counts summed over data parallel at the log
interval), so they cost nothing per step; streaks are counted in steps at the log interval's resolution.
- dead experts: an expert that got no token for N steps (`--expert-alarm-steps`);
- collapse: the busiest expert's share of the layer's assignments above X times uniform (X / E) for N steps
  (`--collapse-factor`; with E <= X experts it cannot fire);
- low entropy: the mean per-token routing entropy, as a fraction of log(E), below `--min-router-entropy`
  for N steps (a router that has stopped hedging usually stops balancing soon after).
Each alarm adds its state to the layer's record in metrics.jsonl, and prints one warning line the first time
it fires in a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALARMS = ("dead_experts", "collapsed", "low_entropy")


@dataclass
class _LayerStreaks:
    idle: list[int] = field(default_factory=list)  # steps since each expert last got a token
    collapsed: int = 0  # steps in a row with the busiest expert above the collapse share
    low_entropy: int = 0  # steps in a row with the routing entropy below the floor
    fired: list[str] = field(default_factory=list)  # alarms already warned about


class ExpertHealth:
    """Streaks per MoE layer, updated from each logged window of routing summaries."""

    def __init__(self, steps: int, collapse_factor: float, min_entropy: float) -> None:
        self.steps, self.collapse_factor, self.min_entropy = steps, collapse_factor, min_entropy
        self.layers: dict[int, _LayerStreaks] = {}
        self.last_step = 0  # the step of the last update: the window since then is what the summaries count
        self.warnings: list[str] = []  # lines not yet printed

    def update(self, moe_layers: list[dict], step: int) -> None:
        """Add each layer's alarm fields (`dead_experts`, `collapsed`, `low_entropy`) to its summary, from the
        `step - last_step` steps the summaries count; queue a warning for each alarm firing for the first time."""
        window, self.last_step = step - self.last_step, step
        for summary in moe_layers:
            counts = summary["tokens_per_expert"]
            streaks = self.layers.setdefault(summary["layer"], _LayerStreaks(idle=[0] * len(counts)))
            streaks.idle = [idle + window if count == 0 else 0 for idle, count in zip(streaks.idle, counts)]
            total = sum(counts)
            busiest = max(counts) / total if total else 0.0
            streaks.collapsed = streaks.collapsed + window if busiest > self.collapse_factor / len(counts) else 0
            entropy = summary.get("router_entropy")
            streaks.low_entropy = streaks.low_entropy + window \
                if entropy is not None and entropy < self.min_entropy else 0
            dead = [expert for expert, idle in enumerate(streaks.idle) if idle >= self.steps]
            summary["dead_experts"] = len(dead)
            summary["collapsed"] = streaks.collapsed >= self.steps
            summary["low_entropy"] = streaks.low_entropy >= self.steps
            details = {
                "dead_experts": f"experts {dead} got no tokens for {self.steps}+ steps (dead experts)",
                "collapsed": f"the busiest expert took {busiest:.0%} of the assignments (over "
                             f"{self.collapse_factor:g}x uniform) for {self.steps}+ steps (router collapse)",
                "low_entropy": f"routing entropy {entropy if entropy is not None else 0.0:.3f} of its maximum, below "
                               f"{self.min_entropy:g} for {self.steps}+ steps (an overconfident router)",
            }
            for alarm in ALARMS:
                if summary[alarm] and alarm not in streaks.fired:
                    streaks.fired.append(alarm)
                    self.warnings.append(f"warning: step {step}: MoE layer {summary['layer']}: {details[alarm]}")

    def take_warnings(self) -> list[str]:
        """The warning lines queued since the last call."""
        lines, self.warnings = self.warnings, []
        return lines

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "layers": {str(layer): vars(streaks).copy()
                                                         for layer, streaks in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))
        self.layers = {int(layer): _LayerStreaks(**streaks) for layer, streaks in state.get("layers", {}).items()}
