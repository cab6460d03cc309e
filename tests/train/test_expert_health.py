"""Expert-health alarms: silent on a healthy default-like run, each firing once (one warning line) on a router
forced to collapse, in metrics.jsonl and the expert_health.png panel; the streaks against a hand count."""

from __future__ import annotations

import sys
import types

import torch

from moetrain.config import Config
from moetrain.train.metrics import MetricsLogger
from moetrain.train.monitor.health import ALARMS, ExpertHealth
from moetrain.train.trainer import Trainer
from tests.helpers import read_records, tiny_config

DEFAULTS = Config().monitor


def default_like(tmp_path, train_iters):
    """The default MoE layout (8 experts every other layer, top-1, the default alarm thresholds and log
    interval), small enough to train 100+ steps in seconds."""
    cfg = tiny_config(tmp_path, train_iters=train_iters, log_interval=10, lr=1e-3, lr_warmup_iters=None)
    cfg.model.num_layers, cfg.model.seq_length = 4, 32
    cfg.moe = Config().moe
    return cfg


def layer_records(save_dir):
    return [(r["step"], layer) for r in read_records(save_dir) if r["type"] == "train" for layer in r["moe_layers"]]


def test_defaults_stay_silent_on_a_default_like_run(tmp_path, capsys):
    steps = DEFAULTS.expert_alarm_steps + 30
    Trainer(default_like(tmp_path, steps), quiet=False).fit()
    layers = layer_records(tmp_path / "run")
    assert len(layers) == 2 * steps // 10
    for _, layer in layers:
        assert layer["dead_experts"] == 0 and not layer["collapsed"] and not layer["low_entropy"]
        assert DEFAULTS.min_router_entropy < layer["router_entropy"] <= 1.0
    assert "warning:" not in capsys.readouterr().out


def force_collapse(trainer: Trainer) -> None:
    """Every router sends every token to expert 0, sure of it."""
    for _, moe in trainer.model.moe_layers():
        logits = moe.router.compute_logits
        moe.router.compute_logits = lambda x, logits=logits: logits(x) + torch.tensor([50.0] + [0.0] * 7)


def test_a_collapsed_router_fires_each_alarm_once(tmp_path, capsys):
    steps = DEFAULTS.expert_alarm_steps + 30
    trainer = Trainer(default_like(tmp_path, steps), quiet=False)
    force_collapse(trainer)
    trainer.fit()
    for step, layer in layer_records(tmp_path / "run"):
        on = step >= DEFAULTS.expert_alarm_steps
        assert layer["dead_experts"] == (7 if on else 0) and layer["collapsed"] == on
        assert layer["low_entropy"] == on and layer["router_entropy"] < 1e-6
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 * len(ALARMS)  # once per alarm and MoE layer, not every log interval
    assert all(line.startswith(f"warning: step {DEFAULTS.expert_alarm_steps}: MoE layer ") for line in warnings)
    assert any("experts [1, 2, 3, 4, 5, 6, 7] got no tokens" in line for line in warnings)
    assert (tmp_path / "run" / "expert_health.png").read_bytes()[:4] == b"\x89PNG"


def test_streaks_count_steps_across_log_windows():
    health = ExpertHealth(steps=20, collapse_factor=2.0, min_entropy=0.5)
    windows = [  # (step, tokens per expert, entropy)
        (10, [9, 1, 0, 0], 0.9),  # expert 0: 90% > 2 x 25%
        (20, [8, 2, 0, 1], 0.4),  # expert 3 came back; experts 2 idle 20 steps: dead
        (25, [5, 5, 0, 0], 0.3),  # balanced enough: the collapse streak ends
    ]
    seen = []
    for step, counts, entropy in windows:
        layer = {"layer": 1, "tokens_per_expert": counts, "router_entropy": entropy}
        health.update([layer], step)
        seen.append((layer["dead_experts"], layer["collapsed"], layer["low_entropy"]))
    assert seen == [(0, False, False), (1, True, False), (1, False, False)]
    assert health.layers[1].idle == [0, 0, 25, 5] and health.layers[1].low_entropy == 15
    assert [line.split(": ", 3)[-1].split(" (")[-1] for line in health.take_warnings()] == \
        ["dead experts)", "router collapse)"]
    assert health.take_warnings() == []
    restored = ExpertHealth(steps=20, collapse_factor=2.0, min_entropy=0.5)
    restored.load_state_dict(health.state_dict())
    assert restored.state_dict() == health.state_dict()



def test_tensorboard_gets_the_health_of_each_layer(tmp_path, monkeypatch):
    scalars = {}

    class FakeWriter:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, tag, value, step):
            scalars[tag] = value

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = MetricsLogger(None, tensorboard_dir=str(tmp_path))
    layer = {"layer": 1, "tokens_per_expert": [4, 0], "router_entropy": 0.05, "dead_experts": 1, "collapsed": True,
             "low_entropy": False}
    logger.log({"type": "train", "step": 10, "loss": 1.0, "moe_layers": [layer]})
    logger.close()
    assert {tag: value for tag, value in scalars.items() if tag.startswith("train/moe_layer_1/")} == {
        "train/moe_layer_1/router_entropy": 0.05, "train/moe_layer_1/dead_experts": 1.0,
        "train/moe_layer_1/collapsed": 1.0, "train/moe_layer_1/low_entropy": 0.0}
