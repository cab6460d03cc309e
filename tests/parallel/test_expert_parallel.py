"""Expert parallelism through the dispatcher's all-to-all, with 2 gloo processes on this machine.

Each rank routes its own tokens; the experts live half on each rank. Outputs must equal the
single-process layer on the same tokens, and expert gradients the sum over both ranks' tokens.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.moe import MoE
from tests.helpers import free_port

WORLD = 2
HIDDEN, FFN, EXPERTS = 8, 16, 4


def _layer(drop_tokens: bool, k: int, ep_size: int = 1, group=None) -> MoE:
    torch.manual_seed(0)
    return MoE(HIDDEN, num_experts=EXPERTS, k=k, ep_size=ep_size, ep_group=group,
               ffn_hidden_size=FFN, drop_tokens=drop_tokens, capacity_factor=1.0, min_capacity=1,
               use_rts=False, top2_2nd_expert_sampling=False, activation="swiglu")


def _inputs(rank: int) -> torch.Tensor:
    torch.manual_seed(100 + rank)
    # rank 1 sends nothing but a handful of tokens: uneven splits, and an all-to-all must still match
    return torch.randn(24 if rank == 0 else 3, HIDDEN)


def _worker(rank: int, port: int, drop_tokens: bool, k: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        full = _layer(drop_tokens, k)
        ep = _layer(drop_tokens, k, ep_size=WORLD, group=dist.group.WORLD)
        local = slice(rank * EXPERTS // WORLD, (rank + 1) * EXPERTS // WORLD)
        with torch.no_grad():
            ep.router.wg.weight.copy_(full.router.wg.weight)
            ep.experts.w1.copy_(full.experts.w1[local])
            ep.experts.w2.copy_(full.experts.w2[local])
        x = _inputs(rank).requires_grad_()
        out, l_aux, counts = ep(x)
        (out.square().sum() + l_aux).backward()
        results[rank] = {"out": out.detach(), "x_grad": x.grad, "w1_grad": ep.experts.w1.grad,
                         "wg_grad": ep.router.wg.weight.grad, "counts": counts}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("drop_tokens,k", [(False, 2), (True, 1), (True, 2)])
def test_expert_parallel_matches_single_process(drop_tokens: bool, k: int) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), drop_tokens, k, results), nprocs=WORLD, join=True)

    full = _layer(drop_tokens, k)
    w1_grad = torch.zeros_like(full.experts.w1)
    for rank in range(WORLD):
        full.zero_grad()
        x = _inputs(rank).requires_grad_()
        out, l_aux, counts = full(x)
        (out.square().sum() + l_aux).backward()
        got = results[rank]
        torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["wg_grad"], full.router.wg.weight.grad, atol=1e-5, rtol=1e-5)
        assert torch.equal(got["counts"], counts)
        w1_grad += full.experts.w1.grad
    for rank in range(WORLD):
        local = slice(rank * EXPERTS // WORLD, (rank + 1) * EXPERTS // WORLD)
        torch.testing.assert_close(results[rank]["w1_grad"], w1_grad[local], atol=1e-5, rtol=1e-5)


def test_expert_parallel_size_without_its_group_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ep_size=2 needs ep_group"):
        MoE(HIDDEN, num_experts=EXPERTS, ep_size=2)
