"""Optimizer param groups, LR schedule values, fp16 loss scaling and autocast."""

import datetime
import itertools
import math
import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moetrain.precision import autocast
from moetrain.train.loss_scaler import LossScaler
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.optimizer import build_optimizer
from tests.helpers import spawn


class TinyMoELike(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.randn(6, 4))
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.expert_w = nn.Parameter(torch.randn(3, 4, 4))  # stacked experts
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tok.weight  # tied


def test_param_groups_split_matrices_from_norms_biases_embeddings():
    model = TinyMoELike()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for p in groups["decay"]["params"]} == {id(model.proj.weight), id(model.expert_w)}
    assert {id(p) for p in groups["no_decay"]["params"]} == {
        id(model.tok.weight), id(model.pos_embed), id(model.norm.weight), id(model.norm.bias), id(model.proj.bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_weight_decay_is_decoupled_and_only_on_decay_group():
    model = TinyMoELike()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam term is 0, so only decoupled decay can move a weight
    opt.step()
    torch.testing.assert_close(model.proj.weight, before["proj.weight"] * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.expert_w, before["expert_w"] * 0.95, rtol=0, atol=1e-7)
    for name in ("tok.weight", "pos_embed", "norm.weight", "proj.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_build_optimizer_rejects_bad_input():
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(nn.Linear(2, 2), lr=1e-3, weight_decay=-1.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, lr=1e-3, weight_decay=0.0)


# ------------------------------------------------------------------------------------------ LR


@pytest.mark.parametrize("step,expected", [
    (0, 0.25), (1, 0.5), (3, 1.0),                         # warmup: max * (step+1) / 4
    (4, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10))),   # update 5: 1/10 into decay
    (8, 0.55),                                             # halfway: cos(pi/2) = 0
    (13, 0.1), (500, 0.1),                                 # update 14 = decay_iters -> min_lr
])
def test_cosine_schedule_hand_values(step, expected):
    assert LRSchedule(1.0, 0.1, warmup_iters=4, decay_iters=14, style="cosine").lr_at(step) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(3, 1.0), (4, 0.91), (8, 0.55), (12, 0.19), (13, 0.1), (99, 0.1)])
def test_linear_schedule_hand_values(step, expected):
    assert LRSchedule(1.0, 0.1, warmup_iters=4, decay_iters=14, style="linear").lr_at(step) == pytest.approx(expected)


def test_constant_schedule_and_no_warmup():
    constant = LRSchedule(2.0, 0.0, warmup_iters=2, decay_iters=0, style="constant")
    assert [constant.lr_at(s) for s in (0, 1, 2, 1000)] == [1.0, 2.0, 2.0, 2.0]
    no_warmup = LRSchedule(1.0, 0.0, warmup_iters=0, decay_iters=4, style="linear")
    assert [no_warmup.lr_at(s) for s in range(5)] == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0])


def test_cosine_decay_is_monotone_after_warmup():
    schedule = LRSchedule(3e-4, 3e-5, warmup_iters=10, decay_iters=110)
    lrs = [schedule.lr_at(s) for s in range(9, 200)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[-1] == pytest.approx(3e-5)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_apply_sets_every_group():
    opt = build_optimizer(TinyMoELike(), lr=1.0, weight_decay=0.1)
    lr = LRSchedule(1.0, 0.1, warmup_iters=4, decay_iters=14).apply(opt, 1)
    assert lr == 0.5 and [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


@pytest.mark.parametrize("kwargs,match", [
    ({"max_lr": 1e-4, "min_lr": 1e-3, "warmup_iters": 1, "decay_iters": 10}, "min_lr"),
    ({"max_lr": 1e-3, "min_lr": 0.0, "warmup_iters": 10, "decay_iters": 10}, "decay_iters"),
    ({"max_lr": 1e-3, "min_lr": 0.0, "warmup_iters": -1, "decay_iters": 10}, "non-negative"),
    ({"max_lr": 1e-3, "min_lr": 0.0, "warmup_iters": 1, "decay_iters": 10, "style": "step"}, "style"),
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


# ----------------------------------------------------------------------------------- LossScaler


def _run(scaler: LossScaler, overflows):
    trace = []
    for overflow in overflows:
        scaler.update(overflow)
        trace.append(scaler.loss_scale)
    return trace


def test_hysteresis_backoff_and_growth_after_window():
    scaler = LossScaler(initial_scale_power=4, scale_window=3, hysteresis=2)
    # 1st overflow spends the hysteresis; 2nd and 3rd halve; 4 clean steps: the 4th (after a window of 3) doubles.
    trace = _run(scaler, [True, True, True, False, False, False, False, False, False, False])
    assert trace == [16, 8, 4, 4, 4, 4, 8, 8, 8, 16]
    assert scaler.skipped_steps == 3
    # growth refilled the hysteresis: the next overflow does not back off
    assert _run(scaler, [True, True]) == [16, 8]


def test_backoff_never_goes_below_min_scale():
    scaler = LossScaler(initial_scale_power=3, hysteresis=1, min_scale=4.0)
    assert _run(scaler, [True, True, True]) == [4, 4, 4]
    assert scaler.skipped_steps == 3


def test_static_scale_never_changes_but_counts_skips():
    scaler = LossScaler.from_config(loss_scale=128.0, loss_scale_window=2)
    assert not scaler.dynamic
    assert set(_run(scaler, [True, False, False, False, False, True, True])) == {128.0}
    assert scaler.skipped_steps == 3


def test_from_config_dynamic_and_validation():
    scaler = LossScaler.from_config(loss_scale=0, initial_scale_power=12, hysteresis=3)
    assert scaler.dynamic and scaler.loss_scale == 4096.0 and scaler.hysteresis == 3
    with pytest.raises(ValueError, match="loss_scale"):
        LossScaler.from_config(loss_scale=-1)
    with pytest.raises(ValueError, match="scale_window"):
        LossScaler(scale_window=0)


def test_scale_and_unscale_recover_true_gradients_and_detect_overflow():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    model(x).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaler = LossScaler(initial_scale_power=10)
    scaler.scale(model(x).square().mean()).backward()
    assert not scaler.unscale_(model.parameters())
    for param, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(param.grad, ref)
    model.weight.grad[0, 0] = float("inf")
    assert scaler.unscale_(model.parameters())
    model.weight.grad.fill_(1.0)
    model.bias.grad[1] = float("nan")
    assert scaler.unscale_(model.parameters())


def test_state_dict_round_trip_continues_identically():
    rng = random.Random(0)
    overflows = [rng.random() < 0.3 for _ in range(60)]
    original = LossScaler(initial_scale_power=8, scale_window=4, hysteresis=2)
    _run(original, overflows[:30])
    restored = LossScaler(initial_scale_power=8, scale_window=4, hysteresis=2)
    restored.load_state_dict(original.state_dict())
    assert _run(restored, overflows[30:]) == _run(original, overflows[30:])
    assert restored.skipped_steps == original.skipped_steps == sum(overflows)


@pytest.mark.parametrize("hysteresis,consecutive", [(1, False), (2, False), (3, False), (2, True)])
def test_matches_deepspeed_dynamic_loss_scaler(monkeypatch, hysteresis, consecutive):
    ds_loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    monkeypatch.setattr(ds_loss_scaler.dist, "get_rank", lambda: 0)  # its overflow log asks for the rank
    reference = ds_loss_scaler.DynamicLossScaler(init_scale=2.0**10, scale_window=5, min_scale=2.0,
                                                 delayed_shift=hysteresis, consecutive_hysteresis=consecutive,
                                                 raise_error_at_min_scale=False)
    ours = LossScaler(initial_scale_power=10, scale_window=5, hysteresis=hysteresis, min_scale=2.0,
                      consecutive_hysteresis=consecutive)
    rng = random.Random(hysteresis)
    for _ in range(400):
        overflow = rng.random() < 0.2
        reference.update_scale(overflow)
        ours.update(overflow)
        assert ours.loss_scale == reference.cur_scale


def test_autocast_dtypes():
    a, b = torch.randn(2, 2), torch.randn(2, 2)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="bf16"):
        autocast("cpu", "int8")


def _unscale_on_rank(rank: int, port: int, results) -> None:
    """Rank 0 holds no gradient, rank 1 an overflowing one: both must enter the flag's reduction (a rank left
    waiting fails after the group's 20 s time-out instead of hanging the suite)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        param = nn.Parameter(torch.ones(3))
        if rank == 1:
            param.grad = torch.tensor([1.0, float("inf"), 2.0])
        results[rank] = float(LossScaler().unscale_([param] if rank == 1 else []))
    finally:
        dist.destroy_process_group()


def test_a_rank_without_gradients_still_joins_the_overflow_reduction():
    # before: the empty rank returned early and the other waited in all_reduce until the group timed out
    assert spawn(_unscale_on_rank, 2) == {0: 1.0, 1: 1.0}
