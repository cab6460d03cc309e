"""The non-finite guard: a NaN step is skipped without touching the optimizer, a diverging run stops
(or rewinds) leaving its last good checkpoint as `latest`, and a checkpoint is never written from NaN weights."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moetrain.checkpoint import CheckpointError, iter_dir_name, load_checkpoint
from moetrain.train.trainer import Trainer, TrainingDiverged
from tests.helpers import read_records, tiny_config, write_corpus


def poison_steps(trainer: Trainer, iterations: set[int]) -> None:
    """Make one gradient NaN in the steps that start at `iterations` (each poisoned once)."""
    forward_backward = trainer.executor.forward_backward

    def poisoned(next_batch, iteration, scaler, *hooks):
        means = forward_backward(next_batch, iteration, scaler, *hooks)
        if iteration in iterations:
            iterations.discard(iteration)
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return means
    trainer.executor.forward_backward = poisoned


def snapshot(trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    optimizer_tensors = [v.clone() for s in trainer.optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor)]
    return [p.detach().clone() for p in trainer.model.parameters()], optimizer_tensors


def test_a_nan_step_is_skipped_with_weights_and_optimizer_untouched(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_iters=4), quiet=True)
    poison_steps(trainer, {2})
    trainer.train_step()
    trainer.train_step()
    weights, moments = snapshot(trainer)
    step = trainer.train_step()  # iteration 2: NaN gradient
    assert step["skipped"] and math.isnan(step["grad_norm"]) and trainer.iteration == 3
    assert trainer.non_finite_in_a_row == 1 and trainer.non_finite_skipped == 1
    after_weights, after_moments = snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_weights))
    assert all(torch.equal(a, b) for a, b in zip(moments, after_moments))
    assert not trainer.train_step()["skipped"] and trainer.non_finite_in_a_row == 0  # a clean step resets


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    # the run: a learning rate far too high, checkpoints every 2 steps, rotation keeping one
    cfg = tiny_config(tmp_path, train_iters=14, lr=30.0, clip_grad=0.0, save_interval=2, lr_decay_style="constant",
                      keep_last_checkpoints=1)
    trainer = Trainer(cfg, quiet=True)
    with pytest.raises(TrainingDiverged, match=r"^step \d+: .*not finite for 3 steps in a row.*Lower --lr") as error:
        trainer.fit()
    assert "\n" not in str(error.value)
    save_dir = tmp_path / "run"
    latest = (save_dir / "latest").read_text().strip()
    assert f"the last good checkpoint is {latest}" in str(error.value)
    ckpt = load_checkpoint(str(save_dir))
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    records = [r for r in read_records(save_dir) if r["type"] == "train"]
    assert records[-1]["skipped_steps"] - records[-4]["skipped_steps"] == 3  # the last 3 steps, in a row


def test_guard_off_applies_nan_and_the_save_refuses_it(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=3, save_interval=1, check_for_nan_in_loss_and_grad=False)
    trainer = Trainer(cfg, quiet=True)
    poison_steps(trainer, {1})
    with pytest.raises(CheckpointError, match="refusing to save iteration 2 .* NaN or inf"):
        trainer.fit()
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000001"
    assert not os.path.exists(tmp_path / "run" / "iter_0000002")


def test_rewind_on_divergence_reloads_the_last_good_checkpoint_and_skips_batches(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=8, save_interval=2, rewind_on_divergence=2, max_rewinds=1)
    trainer = Trainer(cfg, quiet=True)
    poison_steps(trainer, {4, 5, 6})
    result = trainer.fit()
    assert result.iteration == 8 and trainer.rewinds == 1
    rewind = [r for r in read_records(tmp_path / "run") if r["type"] == "rewind"]
    # no checkpoint is written while the streak (steps 4-6) is open: the rewind goes back to the one at 4
    assert rewind == [{"type": "rewind", "step": 4, "diverged_at": 7, "skipped_batches": 2, "rewind": 1}]
    # steps 0-3, 4-6 (skipped), then 4-7 again: the rewound steps see data 2 batches further on
    assert len(result.losses) == 4 + 3 + 4 and all(math.isnan(x) for x in result.losses[4:7])
    assert all(math.isfinite(x) for x in result.losses[7:])
    drawn = trainer.train_data.state_dict()
    fresh = Trainer(tiny_config(tmp_path, save=None, train_iters=8), quiet=True).train_data
    for _ in range(4 + 2 + 4):
        fresh.next_batch(cfg.training.micro_batch_size)
    assert fresh.state_dict() == drawn


class FromIteration:
    """Every iteration from `first` on (a run that keeps diverging)."""

    def __init__(self, first: int) -> None:
        self.first = first

    def __contains__(self, iteration: int) -> bool:
        return iteration >= self.first

    def discard(self, iteration: int) -> None:
        pass


def test_a_run_still_diverging_after_max_rewinds_stops(tmp_path):
    cfg = tiny_config(tmp_path, train_iters=12, save_interval=2, rewind_on_divergence=1, max_rewinds=1)
    trainer = Trainer(cfg, quiet=True)
    poison_steps(trainer, FromIteration(4))
    with pytest.raises(TrainingDiverged, match="^step 7: .*not finite for 3 steps"):
        trainer.fit()
    assert trainer.rewinds == 1


@pytest.mark.parametrize("scale_power,min_scale,counts", [(8, 1.0, False), (0, 1.0, True)],
                         ids=["scaler-can-back-off", "scaler-at-its-floor"])
def test_fp16_overflow_counts_as_divergence_only_at_the_scalers_floor(tmp_path, monkeypatch, scale_power,
                                                                       min_scale, counts):
    cfg = tiny_config(tmp_path, save=None, precision="fp16", initial_scale_power=scale_power, hysteresis=1,
                      min_loss_scale=min_scale, train_iters=4)
    trainer = Trainer(cfg, quiet=True)
    monkeypatch.setattr(trainer.scaler, "unscale_", lambda params, device: torch.ones(()))  # every step overflows
    for _ in range(3):
        step = trainer.train_step()
        assert step["skipped"]
    assert trainer.scaler.skipped_steps == 3 and trainer.non_finite_skipped == 0  # the scaler's skips
    assert trainer.non_finite_in_a_row == (3 if counts else 0)
    if counts:
        with pytest.raises(TrainingDiverged, match="not finite for 4 steps in a row"):
            trainer.fit()


def resume_copy(tmp_path, source_run, iteration: int, **training) -> Trainer:
    """A new run in its own directory resumed from `source_run`'s checkpoint at `iteration` (its only one)."""
    run = tmp_path / "resumed"
    shutil.copytree(source_run / iter_dir_name(iteration), run / iter_dir_name(iteration))
    (run / "latest").write_text(iter_dir_name(iteration) + "\n")
    return Trainer(tiny_config(tmp_path, save="resumed", load=str(run), **training), quiet=True)


def test_a_resumed_run_remembers_the_rewinds_it_already_used(tmp_path):
    # one rewind allowed; the run rewinds at step 7, is saved at 8, then diverges again: it must stop,
    # also when resumed from the checkpoint at 8
    training = dict(train_iters=12, save_interval=2, rewind_on_divergence=1, max_rewinds=1)
    whole = Trainer(tiny_config(tmp_path, **training), quiet=True)
    poison_steps(whole, {4, 5, 6, 8, 9, 10})
    with pytest.raises(TrainingDiverged, match="^step 11: ") as whole_error:
        whole.fit()
    resumed = resume_copy(tmp_path, tmp_path / "run", 8, **training)
    assert resumed.rewinds == 1 and resumed.non_finite_skipped == 3
    poison_steps(resumed, {8, 9, 10})
    with pytest.raises(TrainingDiverged, match="^step 11: ") as resumed_error:
        resumed.fit()
    assert str(resumed_error.value).split(";")[0] == str(whole_error.value).split(";")[0]
    assert resumed.rewinds == 1 and resumed.non_finite_skipped == whole.non_finite_skipped == 6


def test_checkpoints_without_guard_state_resume_with_zero_counts(tmp_path):
    Trainer(tiny_config(tmp_path, train_iters=2), quiet=True).fit()
    path = tmp_path / "run" / iter_dir_name(2) / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["extra"]["guard"], state["with_manifest"]  # as written before the guard state (and manifests)
    torch.save(state, path)
    (tmp_path / "run" / iter_dir_name(2) / "manifest.json").unlink()
    resumed = Trainer(tiny_config(tmp_path, save="again", load=str(tmp_path / "run"), train_iters=3), quiet=True)
    assert resumed.iteration == 2
    assert (resumed.non_finite_in_a_row, resumed.non_finite_skipped, resumed.rewinds) == (0, 0, 0)


def spy_saves(trainer: Trainer) -> list[tuple[int, int]]:
    """(iteration, non-finite steps in a row) of every save the trainer makes."""
    saves, save = [], trainer.save

    def recorded():
        saves.append((trainer.iteration, trainer.non_finite_in_a_row))
        return save()
    trainer.save = recorded
    return saves


def test_no_checkpoint_is_written_or_rotated_away_while_a_streak_is_open(tmp_path):
    # the two runs at tiny size: 6 healthy steps saved every step keeping 3, then --lr 1e3 on top
    Trainer(tiny_config(tmp_path, train_iters=6, save_interval=1, keep_last_checkpoints=3), quiet=True).fit()
    healthy = load_checkpoint(str(tmp_path / "run"), 6).model_state
    cfg = tiny_config(tmp_path, train_iters=40, lr=1e3, lr_decay_style="constant", load=str(tmp_path / "run"),
                      save_interval=1, keep_last_checkpoints=3)
    trainer = Trainer(cfg, quiet=True)
    saves = spy_saves(trainer)
    with pytest.raises(TrainingDiverged, match=r"stopped without saving, the last good checkpoint is iter_\d+"):
        trainer.fit()
    streak_start = trainer.streak_start
    assert all(in_a_row == 0 for _, in_a_row in saves) and saves[-1][0] <= streak_start
    kept = sorted(int(p.name[len("iter_"):]) for p in (tmp_path / "run").glob("iter_*"))
    assert 6 in kept and max(kept) <= streak_start  # the healthy checkpoint survives the rotation
    assert all(torch.equal(a, b) for a, b in zip(healthy.values(), load_checkpoint(str(tmp_path / "run"), 6)
                                                  .model_state.values()))
    assert (tmp_path / "run" / "latest").read_text().strip() == iter_dir_name(max(kept))


def test_each_rewind_goes_further_back_than_the_checkpoints_that_diverged_again(tmp_path):
    Trainer(tiny_config(tmp_path, train_iters=6, save_interval=1, keep_last_checkpoints=3), quiet=True).fit()
    cfg = tiny_config(tmp_path, train_iters=40, lr=1e3, lr_decay_style="constant", load=str(tmp_path / "run"),
                      save_interval=1, keep_last_checkpoints=3, rewind_on_divergence=2, max_rewinds=2)
    trainer = Trainer(cfg, quiet=True)
    with pytest.raises(TrainingDiverged):
        trainer.fit()
    rewinds = [r["step"] for r in read_records(tmp_path / "run") if r["type"] == "rewind"]
    assert len(rewinds) == 2 and rewinds[1] < rewinds[0]  # never the same diverged weights twice
    assert trainer.rewound_to == set(rewinds)


def test_fp16_stops_a_diverging_run_the_same_way(tmp_path):
    # a non-finite loss under fp16 is no overflow a lower scale mends: it opens the streak at once
    Trainer(tiny_config(tmp_path, train_iters=4, save_interval=1, keep_last_checkpoints=2), quiet=True).fit()
    cfg = tiny_config(tmp_path, precision="fp16", train_iters=40, lr=1e3, lr_decay_style="constant",
                      load=str(tmp_path / "run"), save_interval=1, keep_last_checkpoints=2)
    trainer = Trainer(cfg, quiet=True)
    saves = spy_saves(trainer)
    with pytest.raises(TrainingDiverged, match="not finite for 3 steps in a row"):
        trainer.fit()
    assert trainer.iteration < 20 and trainer.scaler.loss_scale > trainer.scaler.min_scale  # not at the floor
    assert all(in_a_row == 0 for _, in_a_row in saves)
    kept = sorted(int(p.name[len("iter_"):]) for p in (tmp_path / "run").glob("iter_*"))
    assert max(kept) <= trainer.streak_start


def test_a_run_ending_inside_a_streak_or_with_a_nan_eval_is_not_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_iters=3), quiet=True)
    poison_steps(trainer, {2})
    with pytest.raises(TrainingDiverged, match=r"^step 3: the run ended inside a non-finite streak \(1 in a row\); "
                                               r"stopped without saving, no checkpoint was written"):
        trainer.fit()
    assert not (tmp_path / "run" / "latest").exists()
    trainer = Trainer(tiny_config(tmp_path, train_iters=2, save="nan-eval"), quiet=True)
    eval_losses = trainer.executor.eval_losses
    trainer.executor.eval_losses = lambda *args: (lambda out: (out[0] * float("nan"), out[1]))(eval_losses(*args))
    with pytest.raises(TrainingDiverged, match="^step 2: the final evaluation loss is nan; stopped without saving"):
        trainer.fit()
    assert not list((tmp_path / "nan-eval").glob("iter_*"))


def test_a_short_fp16_run_with_nan_losses_exits_1_in_one_line(tmp_path):
    corpus = write_corpus(tmp_path)
    done = subprocess.run([sys.executable, "-m", "moetrain", "train", "--num-layers", "2", "--hidden-size", "32",
                           "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
                           "--num-experts", "4", "--no-progress-bar", "--data-path", corpus, "--tokenizer-type",
                           "byte", "--data-cache-dir", str(tmp_path / "cache"), "--fp16", "--train-iters", "2", "--lr",
                           "1e3", "--lr-warmup-iters", "0", "--save", str(tmp_path / "f")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "stopped without saving" in errors[0], done.stderr
    assert not list((tmp_path / "f").glob("iter_*"))
