"""The routing entropy RoutingStats reports: each token's entropy over the experts, averaged, over log(E)."""

from __future__ import annotations

import math

import torch

from moetrain.moe import MoE


def test_router_entropy_is_the_mean_token_entropy_over_log_e():
    torch.manual_seed(0)
    layer = MoE(8, num_experts=4, k=1, drop_tokens=False)
    x = torch.randn(2, 5, 8)
    layer(x)
    with torch.no_grad():
        probs = torch.softmax(x.reshape(-1, 8).double() @ layer.router.wg.weight.double().t(), dim=1)
        expected = float(-(probs * probs.log()).sum(1).mean() / math.log(4))
    assert math.isclose(layer.routing_stats.summary()["router_entropy"], expected, rel_tol=1e-5)


def test_padding_is_left_out_of_the_entropy():
    torch.manual_seed(0)
    layer = MoE(8, num_experts=4, k=1, drop_tokens=False)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    layer(x, token_mask=mask)
    masked = layer.routing_stats.summary()["router_entropy"]
    layer(x[:, :3])
    assert math.isclose(masked, layer.routing_stats.summary()["router_entropy"], rel_tol=1e-6)
