"""--profile on the CPU: a Chrome trace of exactly the chosen steps on the chosen rank, and the top-ops table
printed once at the end."""

from __future__ import annotations

import json

from moetrain.train.trainer import Trainer
from tests.helpers import tiny_config


def test_profile_writes_a_trace_and_prints_the_top_ops(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train_iters=5)
    cfg.monitor.profile, cfg.monitor.profile_step_start, cfg.monitor.profile_step_end = True, 1, 3
    trainer = Trainer(cfg, quiet=False)
    started = []
    step = trainer.train_step
    trainer.train_step = lambda: started.append(trainer.profiler.running is not None) or step()
    trainer.fit()
    assert started == [False, True, True, False, False]  # steps 1 and 2 only
    trace = json.loads((tmp_path / "run" / "profile" / "rank0.pt.trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    out = capsys.readouterr().out
    table = out[out.index("profile: top 15 ops by self CPU time"):].splitlines()[:2 + 15 + 1]
    assert table[-1] == f"trace: {tmp_path / 'run' / 'profile' / 'rank0.pt.trace.json'}"
    assert all(float(line.split()[-1].rstrip("%")) >= 0 for line in table[2:-1])
    assert out.count("profile: top") == 1


def test_a_rank_not_listed_is_not_profiled(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=2)
    cfg.monitor.profile, cfg.monitor.profile_step_start, cfg.monitor.profile_step_end = True, 0, 1
    cfg.monitor.profile_ranks = [1]
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert trainer.profiler.summary is None and not (tmp_path / "run" / "profile").exists()
