"""Parity of moetrain's MoE layer with DeepSpeed 0.19's `deepspeed.moe.layer.MoE`.

Both layers get the same weights (moetrain loads DeepSpeed's state dict through
`from_deepspeed_state_dict`), the same inputs and the same random state (torch.manual_seed before
each forward). Outputs, l_aux, exp_counts and all gradients must agree to float32 rounding, and
both must consume the global RNG identically (moetrain promises DeepSpeed's draw order).
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("deepspeed")

from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import logger as ds_logger

from moetrain.moe import MoE, from_deepspeed_state_dict

ds_logger.setLevel(logging.ERROR)

HIDDEN, FFN, EXPERTS = 8, 16, 8
BATCH, SEQ = 2, 12  # 24 tokens
TRAIN_CF, EVAL_CF = 0.5, 0.75
ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 2e-6, 1e-5


def _expert() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))


def _ds_key_to_moetrain(name: str) -> str:
    """Independent key map (written here, not taken from moetrain) used to pair gradients."""
    if name == "deepspeed_moe.gate.wg.weight":
        return "router.wg.weight"
    prefix = "deepspeed_moe.experts.deepspeed_experts."
    if name.startswith(prefix):
        return "experts.experts." + name[len(prefix):]
    return name  # mlp.*, coefficient.*


def _make_pair(*, k: int, drop_tokens: bool = True, use_residual: bool = False,
               use_rts: bool = False, noisy_gate_policy: str | None = None,
               top2_2nd_expert_sampling: bool = False, num_experts: int = EXPERTS,
               hidden: int = HIDDEN, capacity_factor: float = TRAIN_CF,
               eval_capacity_factor: float = EVAL_CF, min_capacity: int = 1,
               gate_scale: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    expert = nn.Sequential(nn.Linear(hidden, FFN), nn.GELU(), nn.Linear(FFN, hidden))
    kwargs = dict(num_experts=num_experts, ep_size=1, k=k, capacity_factor=capacity_factor,
                  eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                  use_residual=use_residual, noisy_gate_policy=noisy_gate_policy,
                  drop_tokens=drop_tokens, use_rts=use_rts,
                  top2_2nd_expert_sampling=top2_2nd_expert_sampling)
    ds = DeepSpeedMoE(hidden, expert, **kwargs)
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.mul_(gate_scale)
        # DeepSpeed deep-copies one expert, so all experts start identical; make them distinct
        # or a token sent to the wrong expert would go unnoticed.
        for param in ds.deepspeed_moe.experts.parameters():
            param.uniform_(-0.4, 0.4)
    # A separate expert instance: with use_residual both layers keep the expert as `mlp`.
    ours = MoE(hidden, copy.deepcopy(expert), **kwargs)
    ours.load_state_dict(from_deepspeed_state_dict(ds.state_dict()))
    return ds, ours


def _run(model: nn.Module, x: Tensor, seed: int, backward: bool = True):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out, l_aux, exp_counts = model(x)
    if backward:
        (out.sum() + l_aux).backward()
    rng_after = torch.rand(16)  # how far the forward advanced the global RNG
    return out, l_aux, exp_counts, x.grad, rng_after


def _assert_parity(ds, ours, x, seed=1234, mode="train", grads=True, rng=False):
    ds.train(mode == "train")
    ours.train(mode == "train")
    d_out, d_aux, d_counts, d_xgrad, d_rng = _run(ds, x, seed, backward=grads)
    o_out, o_aux, o_counts, o_xgrad, o_rng = _run(ours, x, seed, backward=grads)
    assert o_out.shape == d_out.shape
    torch.testing.assert_close(o_out, d_out, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(o_aux, d_aux, atol=ATOL, rtol=1e-6)
    assert torch.equal(o_counts.long(), d_counts.long()), (o_counts, d_counts)
    if grads:
        torch.testing.assert_close(o_xgrad, d_xgrad, atol=GRAD_ATOL, rtol=GRAD_RTOL)
        ours_params = dict(ours.named_parameters())
        ds_params = dict(ds.named_parameters())
        assert len(ours_params) == len(ds_params)
        for name, p in ds_params.items():
            q = ours_params[_ds_key_to_moetrain(name)]
            if p.grad is None:
                assert q.grad is None or torch.count_nonzero(q.grad) == 0, name
                continue
            assert q.grad is not None, f"no gradient for {name}"
            torch.testing.assert_close(q.grad, p.grad, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
    if rng:
        assert torch.equal(o_rng, d_rng), "moetrain consumed the global RNG differently"
    return d_out, d_counts


def _capacity(tokens: int, experts: int, cf: float, k: int, min_capacity: int) -> int:
    return max(math.ceil(tokens / experts * cf * k), min_capacity)


def _inputs(seed: int = 7, batch: int = BATCH, seq: int = SEQ, hidden: int = HIDDEN) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, hidden, generator=g)



# -- deterministic routing: k, drop_tokens, train/eval, residual ------------------------------
@pytest.mark.parametrize("use_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["drop", "nodrop"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sparse_moe_layer_matches_deepspeed(k, drop_tokens, mode, use_residual):
    ds, ours = _make_pair(k=k, drop_tokens=drop_tokens, use_residual=use_residual)
    x = _inputs()
    _, counts = _assert_parity(ds, ours, x, mode=mode)
    tokens = BATCH * SEQ
    cf = TRAIN_CF if mode == "train" else EVAL_CF
    capacity = _capacity(tokens, EXPERTS, cf, k, 1)
    assert int(counts.sum()) == tokens * k
    if drop_tokens:
        # drops really happen in the dropping cases, so parity covers the capacity logic
        assert int(counts.max()) > capacity
        ds.train(mode == "train")
        with torch.no_grad():
            dropped_out = ds(x)[0]
            ds.deepspeed_moe.gate.drop_tokens = False
            full_out = ds(x)[0]
        assert not torch.allclose(dropped_out, full_out, atol=1e-5)


def test_sparse_moe_layer_train_and_eval_capacity_differ_like_deepspeed():
    """eval_capacity_factor applies in eval: both libraries keep more tokens there."""
    ds, ours = _make_pair(k=1, capacity_factor=0.5, eval_capacity_factor=2.0)
    x = _inputs()
    outs = {}
    for mode in ("train", "eval"):
        outs[mode], _ = _assert_parity(ds, ours, x, mode=mode, grads=False)
    zero_rows = {m: int((o.reshape(-1, HIDDEN).abs().sum(1) == 0).sum()) for m, o in outs.items()}
    assert zero_rows["train"] > zero_rows["eval"]


# -- random routing: RTS, noisy gates, second-expert sampling ---------------------------------
RANDOM_CASES = [
    dict(k=1, use_rts=True),
    dict(k=1, use_rts=True, noisy_gate_policy="Jitter"),
    dict(k=1, use_rts=True, noisy_gate_policy="RSample"),
    dict(k=1, use_rts=False, noisy_gate_policy="RSample"),
    dict(k=1, use_rts=True, noisy_gate_policy="None"),
    dict(k=2, top2_2nd_expert_sampling=True),
    dict(k=2, top2_2nd_expert_sampling=True, noisy_gate_policy="Jitter"),
    dict(k=4, noisy_gate_policy="Jitter"),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", RANDOM_CASES, ids=_case_id)
def test_sparse_moe_layer_gradients_match_deepspeed_with_random_routing(case, mode):
    ds, ours = _make_pair(**case, use_residual=True)
    _assert_parity(ds, ours, _inputs(), seed=99, mode=mode)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_router_random_routing_really_is_random(seed):
    """Guard for the test above: RTS / RSample / sampling change with the seed in both libraries,
    so equality under the same seed is a real check of the draw order."""
    ds, ours = _make_pair(k=1, use_rts=True, noisy_gate_policy="RSample")
    x = _inputs()
    a = _assert_parity(ds, ours, x, seed=seed, grads=False)[0]
    b = _assert_parity(ds, ours, x, seed=seed + 100, grads=False)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["drop", "nodrop"])
@pytest.mark.parametrize("case", [
    dict(k=1, use_rts=True),
    dict(k=1, use_rts=False),
    dict(k=1, use_rts=True, noisy_gate_policy="RSample"),
    dict(k=1, use_rts=True, noisy_gate_policy="Jitter"),
    dict(k=2, top2_2nd_expert_sampling=True),
    dict(k=2, top2_2nd_expert_sampling=False),
    dict(k=4, noisy_gate_policy="Jitter"),
], ids=_case_id)
def test_topk_router_consumes_global_rng_like_deepspeed(case, drop_tokens, mode):
    """Same number and order of random draws as DeepSpeed: after one forward the global RNG is
    in the same state, so dropout and the next MoE layer of a seeded model match DeepSpeed's."""
    ds, ours = _make_pair(**case, drop_tokens=drop_tokens)
    _assert_parity(ds, ours, _inputs(), seed=5, mode=mode, grads=False, rng=True)


# -- a larger top-1 case where torch.topk's tie order decides which tokens stay -----------------
def test_topk_router_large_top1_tie_order_matches_deepspeed():
    hidden, experts = 16, 16
    ds, ours = _make_pair(k=1, num_experts=experts, hidden=hidden, capacity_factor=1.0,
                          eval_capacity_factor=1.0, min_capacity=4, gate_scale=3.0)
    x = _inputs(seed=3, batch=4, seq=128, hidden=hidden)  # 512 tokens
    out, counts = _assert_parity(ds, ours, x, mode="train")
    capacity = _capacity(512, experts, 1.0, 1, 4)
    assert int(counts.max()) > capacity  # ties among many same-expert tokens are resolved
    dropped = int((counts - capacity).clamp(min=0).sum())
    zero_rows = int((out.reshape(-1, hidden).abs().sum(1) == 0).sum())
    assert zero_rows == dropped


# -- from_deepspeed_state_dict ----------------------------------------------------------------
def test_from_deepspeed_state_dict_maps_every_key():
    ds, _ = _make_pair(k=2, use_residual=True)
    converted = from_deepspeed_state_dict(ds.state_dict())
    assert set(converted) == {_ds_key_to_moetrain(n) for n in ds.state_dict()}
    for name, value in ds.state_dict().items():
        assert torch.equal(converted[_ds_key_to_moetrain(name)], value)


def test_from_deepspeed_state_dict_with_prefix_ignores_other_layers():
    ds, ours = _make_pair(k=1)
    model_sd = {f"layers.3.mlp.{n}": v for n, v in ds.state_dict().items()}
    model_sd["layers.3.attn.weight"] = torch.zeros(2)
    converted = from_deepspeed_state_dict(model_sd, prefix="layers.3.mlp.")
    ours.load_state_dict(converted)  # strict: exactly the layer's keys


def test_from_deepspeed_state_dict_without_gate_raises():
    ds, _ = _make_pair(k=1)
    sd = {n: v for n, v in ds.state_dict().items() if "gate" not in n}
    with pytest.raises(ValueError, match="gate"):
        from_deepspeed_state_dict(sd)


def test_from_deepspeed_state_dict_unknown_key_raises():
    ds, _ = _make_pair(k=1)
    sd = dict(ds.state_dict())
    sd["deepspeed_moe.something_else.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="something_else"):
        from_deepspeed_state_dict(sd)
