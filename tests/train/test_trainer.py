"""The training loop on a tiny MoE and a tiny repetitive corpus: learning, exact resume, fp16 overflow skipping,
gradient accumulation, metrics.jsonl schema and plots, loss composition, config/data errors."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moetrain.config import ConfigError
from moetrain.data import DataError
from moetrain.train import trainer as trainer_module
from moetrain.train.trainer import Trainer
from tests.helpers import ROOT, read_records, tiny_config


def test_a_run_that_writes_no_plot_never_imports_matplotlib(tmp_path):
    """Plotting loads where a plot is written (the end of a saving run on rank 0): a training process that never
    plots, as every other rank of a parallel run, does not import matplotlib."""
    script = ("import pathlib, sys\n"
              "from moetrain.train.trainer import train\n"
              "from tests.helpers import tiny_config\n"
              f"train(tiny_config(pathlib.Path({str(tmp_path)!r}), save=None, train_iters=2), quiet=True)\n"
              "print('matplotlib' in sys.modules)\n")
    root = ROOT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "False"


def test_training_step_loss_falls_on_repetitive_text(tmp_path):
    cfg = tiny_config(tmp_path, save=None, train_iters=25, lr=1e-2, lr_decay_style="constant")
    result = Trainer(cfg, quiet=True).fit()
    losses = result.losses
    assert len(losses) == 25 and result.iteration == 25
    assert all(math.isfinite(x) for x in losses)
    # at init the byte model predicts ~uniformly over 257 ids: lm loss ln 257 = 5.55 (+ 0.01 * aux ~ 0.02)
    assert abs(losses[0] - math.log(257)) < 0.25
    # the text uses 28 distinct bytes: a model that learnt even the unigram drops below ln 28 = 3.33
    assert sum(losses[-5:]) / 5 < math.log(28) < losses[0] - 2
    assert result.final_eval_loss is not None and result.final_eval_loss < math.log(28)


def resume_config(tmp_path, save, **training):
    # 2 micro-batches of 2 per step; RSample noisy gating and random token selection (RTS, capacity 1.0 drops
    # tokens) and dropout all draw from the torch RNG, so only a bitwise RNG restore reproduces the run.
    cfg = tiny_config(tmp_path, save=save, micro_batch_size=2, global_batch_size=4, train_iters=6,
                      save_interval=3, eval_interval=3, lr_warmup_iters=2, **training)
    cfg.moe.noisy_gate_policy, cfg.moe.use_rts, cfg.moe.drop_tokens = "RSample", True, True
    cfg.moe.train_capacity_factor = 1.0
    cfg.model.hidden_dropout = 0.1
    return cfg


def test_exact_resume_with_accumulation_and_noisy_gating(tmp_path, monkeypatch):
    run_a = Trainer(resume_config(tmp_path, "a"), quiet=True)
    assert run_a.accumulation == 2
    result_a = run_a.fit()
    assert len(result_a.losses) == 6
    assert os.path.isdir(tmp_path / "a" / "iter_0000003") and os.path.isdir(tmp_path / "a" / "iter_0000006")
    records_a = read_records(tmp_path / "a")
    assert any(r["type"] == "train" and r["moe_layers"][0]["drop_fraction"] > 0 for r in records_a)  # RTS used

    # B: a save directory holding only A's step-3 checkpoint, resumed with --load = --save (via `latest`)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "iter_0000003", tmp_path / "b" / "iter_0000003")
    (tmp_path / "b" / "latest").write_text("iter_0000003\n")
    cfg_b = resume_config(tmp_path, "b", load=str(tmp_path / "b"))
    run_b = Trainer(cfg_b, quiet=True)
    assert run_b.iteration == 3
    result_b = run_b.fit()
    assert result_b.iteration == 6
    assert result_b.losses == result_a.losses[3:]  # bitwise, fp32 on CPU
    state_a, state_b = run_a.model.state_dict(), run_b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    opt_a, opt_b = run_a.optimizer.state_dict()["state"], run_b.optimizer.state_dict()["state"]
    for index in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[index][key], opt_b[index][key]), (index, key)
    assert result_b.final_eval_loss == result_a.final_eval_loss
    assert (tmp_path / "b" / "latest").read_text().strip() == "iter_0000006"
    logged_b = [r["loss"] for r in read_records(tmp_path / "b") if r["type"] == "train"]
    assert logged_b == [r["loss"] for r in records_a if r["type"] == "train"][3:]

    # C loads the step-3 iter_* directory itself

    cfg_c = resume_config(tmp_path, "c", load=str(tmp_path / "a" / "iter_0000003"))
    assert Trainer(cfg_c, quiet=True).fit().losses == result_a.losses[3:]

    # control: without the RNG restore the continuation differs, so the comparisons above can fail
    monkeypatch.setattr(trainer_module, "restore_rng_state", lambda state: None)
    cfg_d = resume_config(tmp_path, "d", load=str(tmp_path / "a" / "iter_0000003"))
    result_d = Trainer(cfg_d, quiet=True).fit()
    assert result_d.losses != result_a.losses[3:]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 x 2 micro-batches give the update of one batch of 4 (no dropping, no aux loss: both are per micro-batch)."""
    def one_step(**training):
        cfg = tiny_config(tmp_path, save=None, train_iters=1, weight_decay=0.0, clip_grad=0.0, **training)
        cfg.moe.drop_tokens, cfg.moe.aux_loss_coeff = False, 0.0
        run = Trainer(cfg, quiet=True)
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        step = run.train_step()
        return before, run.model.state_dict(), step

    before_a, after_a, step_a = one_step(micro_batch_size=4)
    before_b, after_b, step_b = one_step(micro_batch_size=2, global_batch_size=4)
    for name in before_a:
        assert torch.equal(before_a[name], before_b[name])  # same seed, same init
        torch.testing.assert_close(after_a[name], after_b[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(after_a["tok_emb.weight"], before_a["tok_emb.weight"])
    assert step_a["losses"]["lm_loss"] == pytest.approx(step_b["losses"]["lm_loss"], rel=1e-6)
    assert step_a["grad_norm"] == pytest.approx(step_b["grad_norm"], rel=1e-4)


def test_fp16_overflow_skips_the_step(tmp_path):
    cfg = tiny_config(tmp_path, precision="fp16", initial_scale_power=8, hysteresis=1, train_iters=3)
    try:
        run = Trainer(cfg, quiet=True)
        with torch.autocast("cpu", dtype=torch.float16):
            run.model(torch.zeros(1, 4, dtype=torch.long))
    except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fp16 autocast does not run this model on CPU: {error}")
    assert run.scaler is not None and run.scaler.loss_scale == 256.0

    first = run.train_step()  # a clean step updates the weights
    assert not first["skipped"] and math.isfinite(first["grad_norm"])
    adam_steps = float(run.optimizer.state_dict()["state"][0]["step"])

    param = run.model.blocks[0].attn.qkv.weight
    hook = param.register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    second = run.train_step()
    hook.remove()
    assert second["skipped"] and math.isnan(second["grad_norm"])
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, before[name]), name  # no update, no NaN written into the weights
    assert float(run.optimizer.state_dict()["state"][0]["step"]) == adam_steps
    assert all(p.grad is None for p in run.model.parameters())  # gradients cleared for the next step
    assert run.scaler.loss_scale == 128.0 and run.scaler.skipped_steps == 1  # hysteresis 1: halve at once
    assert run.iteration == 2  # a skipped step still counts as an iteration (as in DeepSpeed)

    result = run.fit()  # the remaining step is clean again
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    last = [r for r in read_records(tmp_path / "run") if r["type"] == "train"][-1]
    assert last["step"] == 3 and last["loss_scale"] == 128.0 and last["skipped_steps"] == 1


def test_fp16_skipped_step_logs_nan_loss_in_fit(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, precision="fp16", initial_scale_power=8, hysteresis=2, train_iters=3)
    run = Trainer(cfg, quiet=True)
    calls = {"n": 0}
    original = run.scaler.unscale_

    def unscale_overflow_on_second(params, device):
        calls["n"] += 1
        overflow = original(params, device)
        return torch.ones(()) if calls["n"] == 2 else overflow

    monkeypatch.setattr(run.scaler, "unscale_", unscale_overflow_on_second)
    result = run.fit()
    assert math.isfinite(result.losses[0]) and math.isnan(result.losses[1]) and math.isfinite(result.losses[2])
    records = {r["step"]: r for r in read_records(tmp_path / "run") if r["type"] == "train"}
    assert records[2]["grad_norm"] is None and records[2]["skipped_steps"] == 1
    assert records[2]["loss_scale"] == 256.0  # hysteresis 2: the first overflow only spends the counter
    assert records[3]["skipped_steps"] == 1


TRAIN_KEYS = {"type", "step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
              "loss_scale", "skipped_steps", "data_drawn", "moe_layers"}
LAYER_KEYS = {"layer", "tokens_per_expert", "drop_fraction", "max_over_min", "max_over_mean", "experts_used",
              "router_entropy", "dead_experts", "collapsed", "low_entropy"}
EVAL_KEYS = {"type", "step", "eval_loss", "eval_ppl", "eval_drop_fraction"}


def test_metrics_jsonl_schema_and_plots(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=6, log_interval=2, eval_interval=4, lr_decay_style="constant",
                      lr=2e-3, micro_batch_size=2, global_batch_size=4)
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 1, 2
    result = Trainer(cfg, quiet=True).fit()
    records = read_records(tmp_path / "run")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [4, 6]
    for record in train:
        assert set(record) == TRAIN_KEYS
        assert isinstance(record["step"], int)
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "tokens_per_s"):
            assert isinstance(record[key], float) and math.isfinite(record[key]), key
        assert record["lr"] == 2e-3  # constant schedule, no warmup
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
        assert record["loss_scale"] is None and record["skipped_steps"] == 0  # fp32
        assert list(record["data_drawn"].values()) == [4 * record["step"]]  # sequences drawn from the one source
        assert [layer["layer"] for layer in record["moe_layers"]] == [0, 1]
        for layer in record["moe_layers"]:
            assert set(layer) == LAYER_KEYS
            assert len(layer["tokens_per_expert"]) == 4
            # routed assignments over the log window: 2 steps x 2 micro x 2 seqs x 16 tokens x top-2
            assert sum(layer["tokens_per_expert"]) == 2 * 2 * 2 * 16 * 2
            assert 0.0 <= layer["drop_fraction"] <= 1.0
            assert 0.0 < layer["experts_used"] <= 1.0
    for record in evals:
        assert set(record) == EVAL_KEYS
        assert record["eval_ppl"] == pytest.approx(math.exp(record["eval_loss"]))
        assert 0.0 <= record["eval_drop_fraction"] <= 1.0
    assert result.final_eval_loss == evals[-1]["eval_loss"]
    for name in ("loss.png", "expert_load.png", "expert_health.png"):
        path = tmp_path / "run" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokens_per_s_counts_train_steps_only(tmp_path, monkeypatch):
    """Evaluations and checkpoint saves between log lines do not dilute the logged throughput (a fake clock:
    each train step takes 1 s, each eval and save 100 s)."""
    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])

    def taking(seconds, method):
        def timed(self, *args, **kwargs):
            clock[0] += seconds
            return method(self, *args, **kwargs)
        return timed

    for name, seconds in (("train_step", 1.0), ("evaluate", 100.0), ("save", 100.0)):
        monkeypatch.setattr(Trainer, name, taking(seconds, getattr(Trainer, name)))
    cfg = tiny_config(tmp_path, train_iters=6, log_interval=2, eval_interval=2, save_interval=2)
    Trainer(cfg, quiet=True).fit()
    train = [r for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["tokens_per_s"] for r in train] == [4 * 16] * 3  # micro-batch 4 x 16 tokens per 1 s step


def test_logged_loss_is_lm_plus_weighted_aux_and_z(tmp_path):
    cfg = tiny_config(tmp_path, save="run", train_iters=3, micro_batch_size=2, global_batch_size=4)
    cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff = 0.3, 0.05
    run = Trainer(cfg, quiet=True)
    run.fit()
    train = [r for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["aux_loss"] > 0 and r["z_loss"] > 0
        expected = r["lm_loss"] + 0.3 * r["aux_loss"] + 0.05 * r["z_loss"]
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
        assert r["loss"] - r["lm_loss"] > 0.3  # the aux terms are really in (aux >= ~1 per layer)


def test_each_load_balancing_type_is_logged_and_they_sum_to_the_aux_loss(tmp_path, capsys):
    cfg = tiny_config(tmp_path, save="run", train_iters=3, micro_batch_size=2, global_batch_size=4)
    cfg.moe.topk, cfg.moe.z_loss_coeff = 2, 0.01
    cfg.moe.load_balancing_type = ["aux_loss", "seq_aux_loss", "global_aux_loss"]
    cfg.moe.load_balancing_coeffs = [1.0, 0.5, 0.25]
    Trainer(cfg).fit()
    train = [r for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert len(train) == 3
    for r in train:  # 2 MoE layers, 2 micro-batches: each value summed over layers, averaged over micro-batches
        parts = [r["balance/aux_loss"], r["balance/seq_aux_loss"], r["balance/global_aux_loss"]]
        assert all(value > 0.5 for value in parts)  # ~1 per layer when balanced
        assert parts[0] + 0.5 * parts[1] + 0.25 * parts[2] == pytest.approx(r["aux_loss"], rel=1e-6)
        assert r["z_loss"] > 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Step 3 |"))
    assert f"(aux_loss {train[-1]['balance/aux_loss']:.4f}, seq_aux_loss" in line
    assert f"Z Loss: {train[-1]['z_loss']:.4f}" in line


def test_bad_config_is_a_one_line_config_error(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.moe.topk = 5
    with pytest.raises(ConfigError, match="--topk 5") as error:
        Trainer(cfg, quiet=True)
    assert "\n" not in str(error.value)


def test_missing_data_is_a_one_line_data_error(tmp_path):
    cfg = tiny_config(tmp_path)
    missing = str(tmp_path / "nowhere.txt")
    cfg.data.data_path = [missing]
    with pytest.raises(DataError) as error:
        Trainer(cfg, quiet=True)
    assert "nowhere.txt" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.filterwarnings("ignore:the validation split holds")
def test_too_little_data_for_seq_length_is_a_data_error(tmp_path):
    cfg = tiny_config(tmp_path, save=None)
    cfg.model.seq_length = 4096
    with pytest.raises(DataError, match="seq") as error:
        Trainer(cfg, quiet=True)
    assert "\n" not in str(error.value)


_FAULTS_SCRIPT = """
import resource, sys, torch
from moetrain.train.host_memory import keep_freed_memory
applied = keep_freed_memory()

def faults_of_touching_64_mib():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults = [faults_of_touching_64_mib() for _ in range(10)]
print(applied, min(faults[-3:]), max(faults[-3:]))  # once the heap has settled (3-5 allocations)
"""


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "opted-out"])
def test_host_memory_freed_pages_are_reused_not_faulted_in_again(opt_out):
    """A step's large buffers come back from the heap: a repeated 64 MiB allocation takes almost
    no page faults (16384 4-KiB pages when each allocation is a fresh mmap). The first few may
    still grow the heap, depending on where other threads' small blocks land."""
    import subprocess
    import sys

    env = dict(os.environ, MOETRAIN_KEEP_FREED_MEMORY="0" if opt_out else "1")
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    applied, fewest, most = out[0] == "True", int(out[1]), int(out[2])
    if opt_out:
        assert not applied and fewest > 8000
    else:
        assert applied and most < 1000


def test_a_resume_drops_the_records_logged_past_its_checkpoint(tmp_path):
    # a run saved at step 2 that crashed after logging steps 3 and 4: the resumed run logs 3 and 4 once
    Trainer(tiny_config(tmp_path, train_iters=4, save_interval=2), quiet=True).fit()
    shutil.rmtree(tmp_path / "run" / "iter_0000004")
    (tmp_path / "run" / "latest").write_text("iter_0000002\n")
    Trainer(tiny_config(tmp_path, train_iters=4, load=str(tmp_path / "run")), quiet=True).fit()
    steps = [r["step"] for r in read_records(tmp_path / "run") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4]
