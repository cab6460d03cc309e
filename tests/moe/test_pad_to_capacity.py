"""--moe-pad-expert-input-to-capacity: every expert's GEMM sees exactly its capacity of rows, whatever
the routing, and the layer's output and gradients are those of the unpadded layer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import ConfigError, parse_train_args
from moetrain.moe import MoE
from moetrain.moe.router import expert_capacity
from tests.helpers import free_port

HIDDEN, EXPERTS = 8, 4


def _layer(pad: bool, **kwargs) -> MoE:
    torch.manual_seed(0)
    kwargs = {"num_experts": EXPERTS, "k": 2, "ffn_hidden_size": 16, "capacity_factor": 1.0, "min_capacity": 1,
              "ffn_bias": True, "drop_policy": "probs", "top2_2nd_expert_sampling": False,
              **kwargs}  # biases: a padded row would not give 0; no sampling: both layers route alike
    return MoE(HIDDEN, pad_expert_input_to_capacity=pad, **kwargs)


def _rows_seen(layer: MoE) -> list[int]:
    seen = []
    layer.experts.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def _forward_backward(layer: MoE, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    x = x.clone().requires_grad_()
    out, _, _ = layer(x, token_mask=mask) if mask is not None else layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "padding-mask"])
def test_padded_expert_input_has_static_shape_and_changes_no_output_or_gradient(masked):
    padded, plain = _layer(True), _layer(False)
    seen = _rows_seen(padded)
    for seed, shift in ((1, 0.0), (2, 2.0)):  # the second routes most tokens to few experts: drops
        torch.manual_seed(seed)
        x = torch.randn(2, 12, HIDDEN) + shift * torch.linspace(0, 1, HIDDEN)
        mask = (torch.arange(12) < 9).expand(2, 12) if masked else None
        padded.zero_grad()
        plain.zero_grad()
        got, want = _forward_backward(padded, x, mask), _forward_backward(plain, x, mask)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    capacity = expert_capacity(24, EXPERTS, 1.0, 2, 1)
    assert seen == [EXPERTS * capacity] * 2


def test_padding_needs_a_capacity():
    with pytest.raises(ValueError, match="--disable-moe-token-dropping"):
        _layer(True, drop_tokens=False)
    with pytest.raises(ConfigError, match="needs a capacity to pad to"):
        parse_train_args(["--moe-pad-expert-input-to-capacity", "--disable-moe-token-dropping"]).validate()
    assert parse_train_args(["--moe-pad-expert-input-to-capacity"]).moe.pad_expert_input_to_capacity


def _expert_parallel_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = {}
        for pad in (True, False):
            layer = _layer(pad)
            layer.shard_experts(rank, dist.group.WORLD)
            seen = _rows_seen(layer)
            torch.manual_seed(3 + rank)
            got[pad] = (_forward_backward(layer, torch.randn(2, 12, HIDDEN)), seen)
        results[rank] = got
    finally:
        dist.destroy_process_group()


def test_padding_under_expert_parallelism():
    """Each rank's local experts get ep_size * capacity rows (every rank may send its capacity)."""
    results = mp.Manager().dict()
    mp.spawn(_expert_parallel_worker, args=(free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        (got, seen), (want, _) = results[rank][True], results[rank][False]
        assert seen == [2 * (EXPERTS // 2) * expert_capacity(24, EXPERTS, 1.0, 2, 1)]
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_padded_layer_compiles_into_one_graph_with_eager_results():
    """The static shapes are for graph capture: the padded layer compiles whole (fullgraph) and matches eager."""
    layer = _layer(True)
    x = torch.randn(24, HIDDEN)

    def step(module):
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        out, l_aux, _ = module(inp)
        (out.square().sum() + l_aux).backward()
        return [out, inp.grad] + [p.grad for p in layer.parameters()]

    eager = step(layer)
    torch._dynamo.reset()
    for got, want in zip(step(torch.compile(layer, fullgraph=True)), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
