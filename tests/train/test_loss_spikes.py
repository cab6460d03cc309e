"""Loss spikes that stay finite (--skip-loss-spikes): a spike batch is skipped without touching weights or
optimizer, the run afterwards equals one that never saw that batch, the detector adds no host sync, and its
state travels in checkpoints."""

from __future__ import annotations

import math

import torch

from moetrain.checkpoint import load_checkpoint
from moetrain.train.monitor.spikes import SpikeDetector
from moetrain.train.trainer import Trainer
from tests.helpers import count_host_syncs, read_records, tiny_config

SPIKE_AT = 12  # iteration whose batch is replaced by a spike


def spike_config(tmp_path, save, train_iters):
    cfg = tiny_config(tmp_path, save=save, train_iters=train_iters, lr_decay_style="constant")
    cfg.moe.drop_tokens = False  # no routing noise: a run shifted by one iteration routes alike
    cfg.monitor.skip_loss_spikes, cfg.monitor.loss_spike_window = True, 8
    return cfg


def inject_spike(trainer: Trainer, iteration: int) -> None:
    """At `iteration` (once: not again after a rewind), a batch of random tokens instead of the next batch (the
    data stream does not move)."""
    next_batch, pending = trainer._next_batch, [iteration]

    def batch():
        if trainer.iteration not in pending:
            return next_batch()
        pending.clear()
        generator = torch.Generator().manual_seed(0)
        shape = (trainer.cfg.training.micro_batch_size, trainer.cfg.model.seq_length)
        inputs, targets = (torch.randint(0, trainer.tokenizer.vocab_size, shape, generator=generator) for _ in "it")
        return inputs, targets
    trainer._next_batch = batch


def test_a_spike_batch_is_skipped_and_the_run_equals_one_without_it(tmp_path):
    spiked = Trainer(spike_config(tmp_path, "spiked", 17), quiet=True)
    inject_spike(spiked, SPIKE_AT)
    with_spike = spiked.fit()
    clean = Trainer(spike_config(tmp_path, None, 16), quiet=True)
    without = clean.fit()
    assert not any(math.isnan(loss) for loss in without.losses)  # no false alarm in the clean run
    assert math.isnan(with_spike.losses[SPIKE_AT]) and spiked.spikes.skipped == 1
    assert with_spike.losses[:SPIKE_AT] == without.losses[:SPIKE_AT]
    assert with_spike.losses[SPIKE_AT + 1:] == without.losses[SPIKE_AT:]  # bit for bit
    for (name, a), b in zip(spiked.model.state_dict().items(), clean.model.state_dict().values()):
        assert torch.equal(a, b), name
    moments = [[v for state in t.optimizer.state.values() for v in state.values()] for t in (spiked, clean)]
    assert len(moments[0]) == len(moments[1]) > 0
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(*moments))  # Adam's step too
    record = next(r for r in read_records(tmp_path / "spiked") if r["type"] == "train" and r["step"] == SPIKE_AT + 1)
    assert record["loss_spike_skips"] == 1 and record["skipped_steps"] == 1
    saved = load_checkpoint(str(tmp_path / "spiked")).extra["loss_spikes"]
    assert saved == spiked.spikes.state_dict() and saved["skipped"] == 1 and len(saved["loss"]) == 8
    resumed = Trainer(spike_config(tmp_path, "spiked", 17), quiet=True)
    resumed.cfg.training.load = str(tmp_path / "spiked")
    resumed._resume(str(tmp_path / "spiked"))
    assert resumed.spikes.state_dict() == saved


def test_the_detector_adds_no_host_sync(tmp_path):
    counts = []
    for on in (False, True):
        cfg = tiny_config(tmp_path, save=None, train_iters=3)
        cfg.monitor.skip_loss_spikes, cfg.monitor.loss_spike_window = on, 2
        trainer = Trainer(cfg, quiet=True)
        trainer.train_step()
        trainer.train_step()  # the window is full: the third step is checked
        with count_host_syncs() as events:
            trainer.train_step()
        counts.append(dict(events))
    assert counts[0] == counts[1]


def test_threshold_is_mean_plus_k_population_deviations_of_applied_steps():
    detector = SpikeDetector(window=4, sigmas=2.0)
    for loss in (1.0, 2.0, 3.0, 4.0):
        assert detector.threshold("loss") == math.inf  # no check before the window is full
        assert not detector.check(loss, 1.0)
    limit = 2.5 + 2.0 * math.sqrt(1.25)  # mean 2.5, population variance 1.25
    assert math.isclose(detector.threshold("loss"), limit)
    assert detector.check(limit + 1e-6, 1.0) and detector.skipped == 1
    assert list(detector.history["loss"]) == [1.0, 2.0, 3.0, 4.0]  # a spike stays out of the window
    assert detector.check(2.0, 1.5) and detector.skipped == 2  # the gradient norm is watched too
    assert not detector.check(2.0, 1.0) and list(detector.history["loss"]) == [2.0, 3.0, 4.0, 2.0]


def test_spikes_in_a_row_rewind_like_divergence(tmp_path):
    cfg = spike_config(tmp_path, "run", 18)
    cfg.training.save_interval, cfg.training.rewind_on_divergence = 4, 1
    trainer = Trainer(cfg, quiet=True)
    for iteration in (12, 13, 14):  # three spikes in a row (--max-skipped-steps 3)
        inject_spike(trainer, iteration)
    result = trainer.fit()
    rewinds = [r for r in read_records(tmp_path / "run") if r["type"] == "rewind"]
    assert [(r["diverged_at"], r["step"]) for r in rewinds] == [(15, 12)]
    assert result.iteration == 18 and trainer.spikes.skipped == 3 and trainer.rewinds == 1
