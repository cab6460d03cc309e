"""The MoE layer never makes a GPU wait for the host, counted on the CPU.

`count_host_syncs` counts, during a block of code, every operation that would synchronise a GPU with
the host: the aten ops that read device memory from the host (`_local_scalar_dense`, behind
`.item()`, `int(t)`, `bool(t)`; `nonzero`; `unique`; `bincount`; `repeat_interleave` without
`output_size`) and the Tensor methods that copy to the host. One forward + backward of the
single-device layer makes none in every routing mode; under expert parallelism (2 gloo processes) exactly
one per layer in the forward (the split sizes) and none in the backward.
`torch.compile(fullgraph=True)` succeeds and matches eager: no graph break, as a CUDA graph capture
would need.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from moetrain.moe import MoE
from moetrain.moe.routing_noise import routing_key
from tests.helpers import ROUTING_MODES, count_host_syncs, gloo_group, routing_mode_layer, spawn


def test_counter_sees_every_kind_of_host_sync():
    """Guard: the counter is not blind (each of these would stall a GPU)."""
    t = torch.tensor([0, 2, 2, 1])
    with count_host_syncs() as events:
        t.sum().item()
        bool(t.any())
        t.nonzero()
        torch.bincount(t)
        torch.unique(t)
        t.tolist()
        torch.repeat_interleave(t)  # no output_size: reads the total on the host
    assert events["Tensor.item"] == 1 and events["Tensor.__bool__"] == 1
    assert events["Tensor.tolist"] == 1 and events["aten::bincount"] == 1
    assert events["aten::nonzero"] == 1
    assert sum(v for k, v in events.items() if "unique" in k) >= 1
    assert events["aten::_local_scalar_dense"] >= 2  # item, bool
    assert events["aten::repeat_interleave without output_size"] == 1


HIDDEN, FFN, EXPERTS, TOKENS = 16, 32, 8, 64
def _layer(**kwargs) -> MoE:
    return routing_mode_layer(HIDDEN, FFN, EXPERTS, capacity_factor=0.5, min_capacity=1, **kwargs)


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_single_device_forward_backward_never_syncs(mode):
    layer = _layer(**ROUTING_MODES[mode])
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    with count_host_syncs() as events:
        out, l_aux, z_loss, _ = layer(x, with_z_loss=True)
        (out.square().sum() + l_aux + z_loss).backward()
        layer.update_expert_bias()
    assert dict(events) == {}
    assert x.grad is not None and layer.experts.w1.grad is not None


def test_capacity_mode_really_drops_in_the_sync_test():
    """Guard: the capacity modes above do drop assignments (the masked-row path is exercised)."""
    layer = _layer(k=2, drop_policy="position")
    decision = layer.router(torch.randn(TOKENS, HIDDEN))
    assert not bool(decision.kept.all())


# ---------------------------------------------------------------------------------------------
# Expert parallelism: one host copy of the split sizes per layer, forward only
# ---------------------------------------------------------------------------------------------
WORLD = 2


def _ep_worker(rank: int, port: int, drop_tokens: bool, results) -> None:
    with gloo_group(rank, WORLD, port):
        layers = [_layer(k=2, drop_tokens=drop_tokens, ep_size=WORLD, ep_group=dist.group.WORLD)
                  for _ in range(2)]
        torch.manual_seed(10 + rank)
        x = torch.randn(TOKENS if rank == 0 else 5, HIDDEN, requires_grad=True)
        with count_host_syncs() as forward_events:
            h = x
            for layer in layers:
                out, l_aux, _ = layer(h)
                h = h + out
        loss = h.square().sum() + l_aux
        with count_host_syncs() as backward_events:
            loss.backward()
        results[rank] = (dict(forward_events), dict(backward_events))


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_expert_parallel_copies_split_sizes_once_per_layer_forward_only(drop_tokens):
    results = spawn(_ep_worker, WORLD, drop_tokens)
    for rank in range(WORLD):
        forward_events, backward_events = results[rank]
        assert forward_events == {"Tensor.tolist": 2}, (rank, forward_events)  # 2 layers
        assert backward_events == {}, (rank, backward_events)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one graph, same numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_compiled_fullgraph_matches_eager(drop_tokens):
    """With second-expert sampling and Jitter keyed by position (moetrain.moe.routing_noise): the same draws
    compiled or not, and a new key each step without recompiling."""
    layer = _layer(k=2, drop_tokens=drop_tokens, ffn_bias=True, top2_2nd_expert_sampling=True,
                   noisy_gate_policy="Jitter")
    x = torch.randn(TOKENS, HIDDEN)

    def step(module, iteration):
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        out, l_aux, z_loss, counts = module(inp, with_z_loss=True, routing_key=routing_key(0, iteration, 0, "cpu"))
        (out.square().sum() + l_aux + z_loss).backward()
        return [out, l_aux, z_loss, counts, inp.grad] + [p.grad for p in layer.parameters()]

    eager = [step(layer, iteration) for iteration in (0, 1)]
    assert not torch.equal(eager[0][0], eager[1][0])  # the key changed the routing
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_layer = torch.compile(layer, fullgraph=True)
        compiled = [step(compiled_layer, iteration) for iteration in (0, 1)]
    for got_step, want_step in zip(compiled, eager):
        for got, want in zip(got_step, want_step):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
