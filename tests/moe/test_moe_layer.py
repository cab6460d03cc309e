"""moetrain's MoE layer against independent float64 references written here.

Pieces: TopK router, MoE expert (GroupedExperts / grouped_mm), sparse MoE layer, no-drop
routing, capacity edge cases, load balancing (l_aux, aux-free bias), shared experts and custom
routers, routing statistics, a training step, and input validation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe import (
    GroupedExperts,
    ModuleExperts,
    MoE,
    Router,
    RoutingConfig,
    RoutingStats,
    TopKRouter,
    expert_capacity,
    grouped_mm,
)

F32_EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# float64 references (per token, plain Python loops)
# ---------------------------------------------------------------------------------------------
def ref_scores(logits: Tensor, score_func: str = "softmax") -> Tensor:
    """Row-wise softmax / sigmoid of float64 logits, written out."""
    rows = []
    for row in logits:
        if score_func == "sigmoid":
            rows.append(1.0 / (1.0 + torch.exp(-row)))
        else:
            e = torch.exp(row - row.max())
            rows.append(e / e.sum())
    return torch.stack(rows)


def ref_choices(scores: Tensor, k: int, bias: Tensor | None = None) -> list[list[int]]:
    sel = scores.detach() if bias is None else scores.detach() + bias.double()
    return [sorted(range(sel.shape[1]), key=lambda e: -float(sel[s, e]))[:k]
            for s in range(sel.shape[0])]


def ref_keep(choices, scores: Tensor, capacity: int | None, policy: str) -> list[list[bool]]:
    """position: first choices of all tokens take slots before second choices, tokens in order.
    probs: each expert keeps its `capacity` assignments with the highest probability."""
    num_experts = scores.shape[1]
    kept = [[True] * len(c) for c in choices]
    if capacity is None:
        return kept
    if policy == "position":
        used = [0] * num_experts
        for j in range(len(choices[0])):
            for s, c in enumerate(choices):
                kept[s][j] = used[c[j]] < capacity
                used[c[j]] += 1
    elif policy == "probs":
        for e in range(num_experts):
            assigned = [(float(scores.detach()[s, e]), s, j) for s, c in enumerate(choices)
                        for j, ce in enumerate(c) if ce == e]
            assigned.sort(key=lambda t: -t[0])
            for rank, (_, s, j) in enumerate(assigned):
                kept[s][j] = rank < capacity
    else:
        raise AssertionError(policy)
    return kept


def ref_weights(choices, kept, scores: Tensor) -> Tensor:
    """Raw probability for k=1; renormalised over kept choices for k>=2; 0 when dropped."""
    k = len(choices[0])
    rows = []
    for s, (c, kp) in enumerate(zip(choices, kept)):
        w = [scores[s, e] if keep else scores[s, e] * 0 for e, keep in zip(c, kp)]
        if k > 1:
            total = sum(w)
            total = torch.clamp(total, min=F32_EPS)
            w = [wi / total for wi in w]
        rows.append(torch.stack(w))
    return torch.stack(rows)


def ref_l_aux(scores: Tensor, choices, k: int, score_func: str = "softmax") -> Tensor:
    """DeepSpeed: E * sum_e mean_s(p[:, e]) * frac(first choices -> e); k>2: all choices, / k."""
    num_tokens, num_experts = scores.shape
    if score_func == "sigmoid":
        scores = scores / scores.sum(dim=1, keepdim=True)
    counted = [c[:1] if k <= 2 else c for c in choices]
    total = scores.new_zeros(())
    for e in range(num_experts):
        me = sum(scores[s, e] for s in range(num_tokens)) / num_tokens
        ce = sum(1 for c in counted for ce_ in c if ce_ == e) / num_tokens
        total = total + me * ce
    loss = num_experts * total
    return loss / k if k > 2 else loss


def ref_z_loss(logits: Tensor) -> float:
    vals = [math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits.detach()]
    return sum(vals) / len(vals)


def ref_capacity(tokens, experts, cf, k, min_capacity):
    return max(math.ceil(tokens / experts * cf * k), min_capacity)


def ref_act(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        return gate * torch.sigmoid(gate) * up
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def ref_expert(x_row: Tensor, e: int, w1, b1, w2, b2, activation: str) -> Tensor:
    h = x_row @ w1[e]
    if b1 is not None:
        h = h + b1[e]
    y = ref_act(h, activation) @ w2[e]
    if b2 is not None:
        y = y + b2[e]
    return y


def ref_moe(x: Tensor, logits: Tensor, params: dict, *, k: int, capacity: int | None,
            policy: str = "position", activation: str = "gelu", score_func: str = "softmax"):
    """Per-token float64 MoE forward. Returns (out, l_aux, choices, kept)."""
    scores = ref_scores(logits, score_func)
    choices = ref_choices(scores, k)
    kept = ref_keep(choices, scores, capacity, policy)
    weights = ref_weights(choices, kept, scores)
    out = []
    for s in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for j, e in enumerate(choices[s]):
            if kept[s][j]:
                acc = acc + weights[s, j] * ref_expert(x[s], e, params["w1"], params.get("b1"),
                                                       params["w2"], params.get("b2"), activation)
        out.append(acc)
    return torch.stack(out), ref_l_aux(scores, choices, k, score_func), choices, kept


def expert_params64(layer: MoE, requires_grad: bool = False) -> dict:
    ex = layer.experts
    params = {"w1": ex.w1, "w2": ex.w2}
    if ex.b1 is not None:
        params.update(b1=ex.b1, b2=ex.b2)
    return {n: p.detach().double().requires_grad_(requires_grad) for n, p in params.items()}


def randomize_(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_router(cls, hidden, experts, k, **kwargs):
    kwargs.setdefault("use_rts", False)  # read by TopKRouter only
    kwargs.setdefault("top2_2nd_expert_sampling", False)
    return cls(hidden, experts, RoutingConfig(k=k, **kwargs))


# ---------------------------------------------------------------------------------------------
# TopK router
# ---------------------------------------------------------------------------------------------
HID, NE, TOKENS = 8, 6, 24  # S / E = 4, cf 0.75 -> capacities 3, 6, 12 for k = 1, 2, 4


@pytest.mark.parametrize("router_cls", [TopKRouter, Router], ids=["TopKRouter", "Router"])
@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_router_matches_float64_reference(k, policy, router_cls):
    torch.manual_seed(0)
    router = make_router(router_cls, HID, NE, k, capacity_factor=0.75, min_capacity=1,
                         drop_policy=policy)
    randomize_(router, scale=0.6)
    x = torch.randn(TOKENS, HID)
    decision = router(x)

    logits = x.double() @ router.wg.weight.double().T
    scores = ref_scores(logits)
    capacity = ref_capacity(TOKENS, NE, 0.75, k, 1)
    choices = ref_choices(scores, k)
    kept = ref_keep(choices, scores, capacity, policy)
    assert not all(all(r) for r in kept), "test setup: some assignments must be dropped"

    assert decision.expert_indices.tolist() == choices
    assert decision.kept.tolist() == kept
    torch.testing.assert_close(decision.weights.double(), ref_weights(choices, kept, scores),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decision.l_aux.double(), ref_l_aux(scores, choices, k),
                               atol=1e-6, rtol=1e-5)
    expected_counts = [sum(c.count(e) for c in choices) for e in range(NE)]
    assert decision.exp_counts.tolist() == expected_counts  # before dropping
    assert decision.z_loss.item() == pytest.approx(ref_z_loss(logits), rel=1e-5)
    # kept per expert never exceeds the capacity
    kept_per_expert = torch.zeros(NE, dtype=torch.long).index_add_(
        0, decision.expert_indices.flatten(), decision.kept.flatten().long())
    assert int(kept_per_expert.max()) <= capacity


@pytest.mark.parametrize("use_rts", [False, True], ids=["unordered", "rts"])
def test_topk_router_k1_default_policy_keeps_min_count_capacity(use_rts):
    """k=1 without an explicit drop policy keeps torch.topk's tie order (or a random subset with
    RTS): which tokens stay is not specified, how many is."""
    torch.manual_seed(1)
    router = TopKRouter(HID, NE, RoutingConfig(capacity_factor=0.75, min_capacity=1, use_rts=use_rts))
    assert router.resolved_drop_policy() == ("random" if use_rts else "unordered")
    randomize_(router, scale=0.8)
    x = torch.randn(TOKENS, HID)
    d = router(x)
    capacity = ref_capacity(TOKENS, NE, 0.75, 1, 1)
    scores = ref_scores(x.double() @ router.wg.weight.double().T)
    assert d.expert_indices[:, 0].tolist() == [int(r.argmax()) for r in scores]
    counts = torch.bincount(d.expert_indices[:, 0], minlength=NE)
    kept = torch.bincount(d.expert_indices[:, 0][d.kept[:, 0]], minlength=NE)
    assert torch.equal(kept, counts.clamp(max=capacity))
    assert int(counts.max()) > capacity  # drops happened
    chosen_p = scores.gather(1, d.expert_indices).squeeze(1)
    torch.testing.assert_close(d.weights[:, 0].double(), torch.where(d.kept[:, 0], chosen_p, 0.0),
                               atol=1e-6, rtol=1e-5)  # raw probability, no renormalisation


@pytest.mark.parametrize("k", [1, 2])
def test_topk_router_sigmoid_score_func_matches_reference(k):
    torch.manual_seed(2)
    router = make_router(TopKRouter, HID, NE, k, capacity_factor=0.75, min_capacity=1,
                         drop_policy="position", score_func="sigmoid")
    randomize_(router, scale=0.6, seed=3)
    x = torch.randn(TOKENS, HID)
    d = router(x)
    logits = x.double() @ router.wg.weight.double().T
    scores = ref_scores(logits, "sigmoid")
    choices = ref_choices(scores, k)
    kept = ref_keep(choices, scores, ref_capacity(TOKENS, NE, 0.75, k, 1), "position")
    assert d.expert_indices.tolist() == choices
    assert d.kept.tolist() == kept
    torch.testing.assert_close(d.weights.double(), ref_weights(choices, kept, scores),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.l_aux.double(), ref_l_aux(scores, choices, k, "sigmoid"),
                               atol=1e-6, rtol=1e-5)


def test_topk_router_expert_capacity_formula():
    for tokens, experts, cf, k, min_cap in [(24, 6, 0.75, 1, 0), (24, 6, 0.75, 2, 0),
                                            (24, 6, 0.75, 4, 0), (20, 8, 1.25, 2, 0),
                                            (8, 4, 0.25, 1, 3), (8, 4, 0.25, 1, 0),
                                            (1, 4, 1.0, 1, 0), (512, 16, 1.0, 1, 4)]:
        assert expert_capacity(tokens, experts, cf, k, min_cap) == ref_capacity(
            tokens, experts, cf, k, min_cap), (tokens, experts, cf, k, min_cap)


# ---------------------------------------------------------------------------------------------
# MoE expert: GroupedExperts vs ModuleExperts, grouped_mm
# ---------------------------------------------------------------------------------------------
class RefExpert(nn.Module):
    """fc1 -> activation -> fc2; for swiglu fc1's output is [gate | up]."""

    def __init__(self, d, f, activation, bias):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d, 2 * f if activation == "swiglu" else f, bias=bias)
        self.fc2 = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.fc2(ref_act(self.fc1(x), self.activation))


COUNTS = [3, 0, 5, 2]  # expert 1 is empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(8, 16), (6, 10)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_moe_expert_grouped_matches_module_experts(activation, bias, shape, dtype):
    d, f = shape
    torch.manual_seed(3)
    grouped = GroupedExperts(len(COUNTS), d, f, activation, bias=bias).to(dtype)
    randomize_(grouped, scale=0.4)
    module = ModuleExperts(RefExpert(d, f, activation, bias), len(COUNTS)).to(dtype)
    with torch.no_grad():
        for e, ex in enumerate(module.experts):
            ex.fc1.weight.copy_(grouped.w1[e].T)
            ex.fc2.weight.copy_(grouped.w2[e].T)
            if bias:
                ex.fc1.bias.copy_(grouped.b1[e])
                ex.fc2.bias.copy_(grouped.b2[e])
    n = sum(COUNTS)
    rows = torch.randn(n, d, dtype=dtype)
    route = torch.rand(n, dtype=torch.float32) + 0.1
    grad_out = torch.randn(n, d, dtype=dtype)
    results = []
    for experts in (grouped, module):
        r = rows.clone().requires_grad_()
        w = route.clone().requires_grad_()
        out = experts(r, COUNTS, w)
        out.backward(grad_out)
        results.append((out.detach(), r.grad, w.grad))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want.to(got.dtype), **tol)
    for e, ex in enumerate(module.experts):
        if COUNTS[e] == 0:
            assert torch.count_nonzero(grouped.w1.grad[e]) == 0
            assert ex.fc1.weight.grad is None
            continue
        torch.testing.assert_close(grouped.w1.grad[e], ex.fc1.weight.grad.T, **tol)
        torch.testing.assert_close(grouped.w2.grad[e], ex.fc2.weight.grad.T, **tol)
        if bias:
            torch.testing.assert_close(grouped.b1.grad[e], ex.fc1.bias.grad, **tol)
            torch.testing.assert_close(grouped.b2.grad[e], ex.fc2.bias.grad, **tol)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_moe_expert_threaded_cpu_path_matches_single_grouped_pass(activation, bias):
    """On a multi-threaded CPU the experts run one by one on worker threads; with one thread the
    whole range runs as one grouped pass. Same outputs and gradients, both paths really taken."""
    from moetrain.moe.expert_threads import THREADED_BELOW_ROWS_PER_EXPERT
    from moetrain.moe.experts import use_expert_threads

    counts = [7, 0, 12, 1, 0, 9, 3, 5]  # uneven, with empty experts
    torch.manual_seed(8)
    experts = GroupedExperts(len(counts), 16, 24, activation, bias=bias)
    randomize_(experts, scale=0.4)
    rows = torch.randn(sum(counts), 16)
    route = torch.rand(sum(counts)) + 0.1
    grad_out = torch.randn(sum(counts), 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert use_expert_threads(rows, len(counts)) == (n == 2)
            big = torch.empty(THREADED_BELOW_ROWS_PER_EXPERT * len(counts), 16)  # stays on BLAS threads
            assert not use_expert_threads(big, len(counts))
            assert use_expert_threads(big[:-1], len(counts)) == (n == 2)
            experts.zero_grad(set_to_none=True)
            r, w = rows.clone().requires_grad_(), route.clone().requires_grad_()
            out = experts(r, counts, w)
            out.backward(grad_out)
            results.append([out.detach(), r.grad, w.grad]
                           + [p.grad.clone() for p in experts.parameters()])
    finally:
        torch.set_num_threads(threads)
    for single, threaded in zip(*results):
        torch.testing.assert_close(threaded, single, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(experts.w1.grad[1]) == 0  # empty experts get zero gradients


@pytest.mark.parametrize("counts", [[64] * 128, [900, 3, 0, 0, 7, 300, 1, 1], [0] * 8, [5] * 4])
@pytest.mark.parametrize("workers", [2, 4])
def test_moe_expert_thread_tasks_cover_every_expert_once_largest_first(counts, workers):
    from moetrain.moe.expert_threads import TASKS_PER_WORKER, expert_tasks

    tasks = expert_tasks(counts, workers)
    covered = sorted(e for task in tasks for e in range(task.start, task.stop))
    assert covered == list(range(len(counts)))
    sizes = [sum(counts[task]) for task in tasks]
    assert sizes == sorted(sizes, reverse=True)
    target = max(1, sum(counts) // (TASKS_PER_WORKER * workers))
    # a task only grows past the target by its last expert
    assert all(sum(counts[t.start:t.stop - 1]) < target for t in tasks)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 4, 0], [2, 3, 0, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("shape", [(8, 4), (3, 5)], ids=["aligned", "unaligned"])
def test_moe_expert_grouped_mm_matches_matmul_loop(counts, shape):
    a, b = shape
    torch.manual_seed(4)
    rows64 = torch.randn(sum(counts), a, dtype=torch.float64)
    weights64 = torch.randn(len(counts), a, b, dtype=torch.float64)
    want = torch.cat([blk @ weights64[e] for e, blk in enumerate(rows64.split(counts))])
    got64 = grouped_mm(rows64, weights64, counts)  # float64: the loop fallback
    torch.testing.assert_close(got64, want, atol=1e-12, rtol=1e-12)
    got32 = grouped_mm(rows64.float(), weights64.float(), counts)  # torch._grouped_mm path
    assert got32.dtype == torch.float32 and got32.shape == (sum(counts), b)
    torch.testing.assert_close(got32.double(), want, atol=1e-5, rtol=1e-5)


def test_moe_expert_float32_uses_torch_grouped_mm_float64_falls_back(monkeypatch):
    """The two paths compared above really are different code: float32 calls
    torch._grouped_mm, float64 (which it does not support) loops."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    counts = [2, 0, 3]
    for dtype in (torch.float32, torch.float64):
        grouped_mm(torch.randn(5, 8, dtype=dtype), torch.randn(3, 8, 4, dtype=dtype), counts)
    assert calls == [torch.float32]


# ---------------------------------------------------------------------------------------------
# Sparse MoE layer
# ---------------------------------------------------------------------------------------------
def make_layer(k, *, activation="gelu", num_experts=NE, hidden=HID, ffn=16, seed=0, **kwargs):
    kwargs.setdefault("capacity_factor", 0.75)
    kwargs.setdefault("min_capacity", 1)
    kwargs.setdefault("drop_policy", "position")
    torch.manual_seed(seed)
    layer = MoE(hidden, None, num_experts, k=k, ffn_hidden_size=ffn, activation=activation,
                use_rts=False, top2_2nd_expert_sampling=False, **kwargs)
    randomize_(layer, scale=0.4, seed=seed + 10)
    return layer


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sparse_moe_layer_matches_per_token_reference(k, activation):
    policy = "position" if k <= 2 else "probs"
    layer = make_layer(k, activation=activation, ffn_bias=True, drop_policy=policy)
    x = torch.randn(2, TOKENS // 2, HID, generator=torch.Generator().manual_seed(5))
    xr = x.clone().requires_grad_()
    out, l_aux, counts = layer(xr)
    assert out.shape == x.shape
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    ((out * g).sum() + l_aux).backward()

    x64 = x.reshape(-1, HID).double().requires_grad_()
    wg64 = layer.router.wg.weight.detach().double().requires_grad_()
    params = expert_params64(layer, requires_grad=True)
    capacity = ref_capacity(TOKENS, NE, 0.75, k, 1)
    ref_out, ref_aux, choices, kept = ref_moe(x64, x64 @ wg64.T, params, k=k, capacity=capacity,
                                              policy=policy, activation=activation)
    assert not all(all(r) for r in kept), "test setup: some assignments must be dropped"
    torch.testing.assert_close(out.reshape(-1, HID).double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_aux.double(), ref_aux, atol=1e-6, rtol=1e-5)
    assert counts.tolist() == [sum(c.count(e) for c in choices) for e in range(NE)]

    ((ref_out * g.reshape(-1, HID).double()).sum() + ref_aux).backward()
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xr.grad.reshape(-1, HID).double(), x64.grad, **tol)
    torch.testing.assert_close(layer.router.wg.weight.grad.double(), wg64.grad, **tol)
    for name, ref_p in params.items():
        torch.testing.assert_close(getattr(layer.experts, name).grad.double(), ref_p.grad,
                                   msg=name, **tol)


class Float64Router(TopKRouter):
    """Logits in the input's dtype (float64) so gradcheck sees an exactly differentiable gate."""

    def compute_logits(self, x):
        return F.linear(x, self.wg.weight)


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["nodrop", "drop"])
def test_sparse_moe_layer_gradcheck(drop_tokens):
    torch.manual_seed(7)
    hidden, ffn, experts, k, tokens = 4, 6, 3, 2, 6
    router = Float64Router(hidden, experts, RoutingConfig(k=k, capacity_factor=0.5, min_capacity=1,
                                                          drop_tokens=drop_tokens, use_rts=False,
                                                          top2_2nd_expert_sampling=False))
    layer = MoE(hidden, None, experts, ffn_hidden_size=ffn, ffn_bias=True, router=router)
    randomize_(layer, scale=0.7, seed=8)
    layer = layer.double()
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    decision = layer.router(x)
    assert bool(decision.kept.all()) != drop_tokens  # capacity 2 x 3 experts < 12 assignments

    def f_x(inp):
        out, l_aux, z_loss, _ = layer(inp, with_z_loss=True)
        return out, l_aux, z_loss

    assert torch.autograd.gradcheck(f_x, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)

    names = ["experts.w1", "experts.b1", "experts.w2", "experts.b2", "router.wg.weight"]
    all_params = dict(layer.named_parameters())
    params = tuple(all_params[n].detach().clone().requires_grad_() for n in names)

    def f_params(*ps):
        out, l_aux, _ = torch.func.functional_call(layer, dict(zip(names, ps)), (x.detach(),))
        return out, l_aux

    assert torch.autograd.gradcheck(f_params, params, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# No-drop routing and capacity edge cases
# ---------------------------------------------------------------------------------------------
def all_to_one(layer: MoE, x: Tensor, target: int) -> Tensor:
    """Force every token to `target`: a constant input feature that only its gate row reads."""
    x = x.clone()
    x[..., 0] = 1.0
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[target, 0] = 10.0
    return x


@pytest.mark.parametrize("k", [1, 2])
def test_no_drop_routing_never_drops_when_all_tokens_pick_one_expert(k):
    layer = make_layer(k, num_experts=4, drop_tokens=False, capacity_factor=0.25)
    x = all_to_one(layer, torch.randn(16, HID), target=2)
    out, _, counts = layer(x)
    assert int(counts[2]) == 16
    assert bool(layer.router(x).kept.all())
    ref_out, _, _, _ = ref_moe(x.double(), x.double() @ layer.router.wg.weight.double().T,
                                  expert_params64(layer), k=k, capacity=None)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    stats = layer.routing_stats.summary()
    assert stats["drop_fraction"] == 0.0
    assert stats["tokens_per_expert"][2] == 16


def test_no_drop_routing_random_inputs_drop_fraction_zero():
    layer = make_layer(2, drop_tokens=False, capacity_factor=0.1)
    for _ in range(3):
        layer(torch.randn(TOKENS, HID))
    stats = layer.routing_stats.summary()
    assert stats["drop_fraction"] == 0.0
    assert sum(stats["tokens_per_expert"]) == 3 * TOKENS * 2


def test_sparse_moe_layer_all_tokens_to_one_expert_keeps_first_capacity():
    """Capacity mode: only the first `capacity` tokens pass; the other experts stay empty."""
    layer = make_layer(1, num_experts=4, capacity_factor=1.0, min_capacity=0)
    x = all_to_one(layer, torch.randn(16, HID), target=1).requires_grad_()
    out, _, counts = layer(x)
    capacity = ref_capacity(16, 4, 1.0, 1, 0)  # 4
    assert counts.tolist() == [0, 16, 0, 0]
    nonzero = (out.abs().sum(1) > 0).tolist()
    assert nonzero == [True] * capacity + [False] * (16 - capacity)
    ref_out, _, _, _ = ref_moe(x.detach().double(),
                               x.detach().double() @ layer.router.wg.weight.double().T,
                               expert_params64(layer), k=1, capacity=capacity)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    # empty experts: zero (not NaN) gradients, and dropped tokens get no expert gradient
    w1_grad = layer.experts.w1.grad
    assert torch.isfinite(w1_grad).all()
    assert [bool(torch.count_nonzero(w1_grad[e])) for e in range(4)] == [False, True, False, False]
    assert torch.count_nonzero(x.grad[capacity:, 1:]) == 0
    assert layer.routing_stats.summary()["drop_fraction"] == pytest.approx(12 / 16)


def test_sparse_moe_layer_min_capacity_wins_over_formula():
    layer = make_layer(1, num_experts=4, capacity_factor=0.25, min_capacity=3)
    x = all_to_one(layer, torch.randn(8, HID), target=0)
    assert ref_capacity(8, 4, 0.25, 1, 0) == 1
    kept = layer.router(x).kept
    assert int(kept.sum()) == 3
    assert kept[:, 0].tolist() == [True] * 3 + [False] * 5


@pytest.mark.parametrize("k", [1, 2])
def test_sparse_moe_layer_single_token(k):
    layer = make_layer(k, num_experts=4, capacity_factor=1.0, min_capacity=0)
    x = torch.randn(1, 1, HID)
    out, l_aux, counts = layer(x)
    assert out.shape == (1, 1, HID)
    assert int(counts.sum()) == k
    x64 = x.reshape(1, HID).double()
    ref_out, ref_aux, _, kept = ref_moe(x64, x64 @ layer.router.wg.weight.double().T,
                                        expert_params64(layer), k=k, capacity=1)
    assert all(kept[0])
    torch.testing.assert_close(out.reshape(1, HID).double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_aux.double(), ref_aux, atol=1e-6, rtol=1e-5)


def test_sparse_moe_layer_eval_uses_eval_capacity_factor():
    layer = make_layer(1, num_experts=4, capacity_factor=0.5, eval_capacity_factor=1.0,
                       min_capacity=0)
    x = all_to_one(layer, torch.randn(16, HID), target=3)
    kept = {}
    for mode in (True, False):
        layer.train(mode)
        out, _, _ = layer(x)
        kept[mode] = int((out.abs().sum(1) > 0).sum())
    assert kept[True] == ref_capacity(16, 4, 0.5, 1, 0) == 2
    assert kept[False] == ref_capacity(16, 4, 1.0, 1, 0) == 4


# ---------------------------------------------------------------------------------------------
# Load balancing
# ---------------------------------------------------------------------------------------------
def identity_router(k, num_experts=3, **kwargs):
    """hidden == num_experts and wg = I, so the input rows are the logits."""
    router = make_router(TopKRouter, num_experts, num_experts, k, drop_tokens=False, **kwargs)
    with torch.no_grad():
        router.wg.weight.copy_(torch.eye(num_experts))
    return router


def test_load_balancing_l_aux_hand_computed():
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    me = [sum(p[e] for p in probs) / 4 for e in range(3)]
    x = torch.tensor(logits)
    # k=1 and k=2: first choices 0, 1, 0, 2 -> fractions 1/2, 1/4, 1/4
    expected = 3 * (me[0] * 0.5 + me[1] * 0.25 + me[2] * 0.25)
    for k in (1, 2):
        assert identity_router(k)(x).l_aux.item() == pytest.approx(expected, rel=1e-6)
    # k=3 of 3 experts: every expert gets every token, E * sum(me * 1) / k = sum(me) = 1
    assert identity_router(3)(x).l_aux.item() == pytest.approx(1.0, rel=1e-6)
    # perfectly balanced k=1 routing with uniform-ish probabilities gives 1
    balanced = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    assert identity_router(1)(balanced).l_aux.item() == pytest.approx(1.0, rel=1e-6)


def test_load_balancing_l_aux_gradient_reaches_gate():
    router = identity_router(1)
    x = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.5, 0.0, 0.2]])
    router(x).l_aux.backward()
    # everything routes to expert 0: the loss pushes expert 0's probability down
    x64 = x.double()
    w = torch.eye(3, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(x64 @ w.T, dim=1)
    (3 * (p.mean(0) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).sum()).backward()
    torch.testing.assert_close(router.wg.weight.grad.double(), w.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_aux_free_bias_steers_selection_not_weights(k):
    torch.manual_seed(9)
    rate = 0.2
    layer = make_layer(k, num_experts=4, drop_tokens=False, expert_bias=True,
                       expert_bias_update_rate=rate)
    xs = [torch.randn(TOKENS, HID) for _ in range(3)]
    with torch.no_grad():
        layer.router.wg.weight[0] += 1.0  # expert 0 favoured by most tokens
        for x in xs:
            x[:, :] += 0.5
    loads = torch.zeros(4)
    for x in xs:
        loads += layer(x)[2].float()
    layer.eval()
    layer(xs[0])  # eval forwards do not count towards the load
    layer.train()
    before = layer.router(xs[0])
    layer.router.pending_load.zero_()
    layer.router.pending_load += loads
    layer.update_expert_bias()
    bias = layer.router.expert_bias
    expected = rate * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(bias, expected)
    assert float(bias[0]) < 0  # over-loaded expert falls
    assert (bias[loads < loads.mean()] > 0).all()  # under-loaded experts rise
    assert float(layer.router.pending_load.abs().sum()) == 0.0  # load consumed
    layer.update_expert_bias()  # nothing pending: no change
    torch.testing.assert_close(layer.router.expert_bias, expected)

    after = layer.router(xs[0])
    logits = xs[0].double() @ layer.router.wg.weight.double().T
    scores = ref_scores(logits)
    choices = ref_choices(scores, k, bias=bias)
    assert after.expert_indices.tolist() == choices
    assert int((after.expert_indices[:, 0] == 0).sum()) < int((before.expert_indices[:, 0] == 0).sum())
    kept = [[True] * k for _ in choices]
    torch.testing.assert_close(after.weights.double(), ref_weights(choices, kept, scores),
                               atol=1e-6, rtol=1e-5)  # unbiased scores


def test_load_balancing_pending_load_counts_training_forwards_only():
    layer = make_layer(2, num_experts=4, drop_tokens=False, expert_bias=True)
    x = torch.randn(TOKENS, HID)
    counts = layer(x)[2]
    torch.testing.assert_close(layer.router.pending_load, counts.float())
    layer.eval()
    layer(x)
    torch.testing.assert_close(layer.router.pending_load, counts.float())


# ---------------------------------------------------------------------------------------------
# Shared experts, custom routers
# ---------------------------------------------------------------------------------------------
def test_sparse_moe_layer_shared_expert_adds_dense_mlp():
    layer = make_layer(2, num_shared_experts=1, ffn_bias=True)
    x = torch.randn(TOKENS, HID)
    out, _, _ = layer(x)
    x64 = x.double()
    routed, _, _, _ = ref_moe(x64, x64 @ layer.router.wg.weight.double().T, expert_params64(layer),
                              k=2, capacity=ref_capacity(TOKENS, NE, 0.75, 2, 1))
    sh = layer.shared_experts
    h = x64 @ sh.fc1.weight.double().T + sh.fc1.bias.double()
    shared = ref_act(h, "gelu") @ sh.fc2.weight.double().T + sh.fc2.bias.double()
    torch.testing.assert_close(out.double(), routed + shared, atol=1e-5, rtol=1e-4)


def test_sparse_moe_layer_sigmoid_score_func_matches_reference():
    layer = make_layer(2, score_func="sigmoid")
    x = torch.randn(TOKENS, HID)
    out, l_aux, _ = layer(x)
    x64 = x.double()
    ref_out, ref_aux, _, _ = ref_moe(x64, x64 @ layer.router.wg.weight.double().T,
                                     expert_params64(layer), k=2,
                                     capacity=ref_capacity(TOKENS, NE, 0.75, 2, 1),
                                     score_func="sigmoid")
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_aux.double(), ref_aux, atol=1e-6, rtol=1e-5)


class FavourLastExpert(Router):
    """Custom scoring only: +10 on the last expert's logit."""

    def compute_logits(self, x):
        logits = super().compute_logits(x)
        bonus = torch.zeros(logits.shape[1], device=logits.device)
        bonus[-1] = 10.0
        return logits + bonus


def test_sparse_moe_layer_custom_router_subclass_changes_selection_only():
    torch.manual_seed(10)
    layer = MoE(HID, None, 4, k=1, ffn_hidden_size=16, drop_tokens=False, router=FavourLastExpert)
    assert isinstance(layer.router, FavourLastExpert)
    randomize_(layer, scale=0.3, seed=11)
    x = torch.randn(TOKENS, HID)
    out, _, counts = layer(x)
    assert counts.tolist() == [0, 0, 0, TOKENS]
    x64 = x.double()
    logits = x64 @ layer.router.wg.weight.double().T
    logits[:, -1] += 10.0
    ref_out, _, _, _ = ref_moe(x64, logits, expert_params64(layer), k=1, capacity=None)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------
def stats_layer():
    layer = MoE(4, None, 4, k=1, ffn_hidden_size=8, capacity_factor=1.0, min_capacity=0,
                drop_policy="position", use_rts=False)
    with torch.no_grad():
        layer.router.wg.weight.copy_(torch.eye(4))
    return layer


def tokens_for(experts: list[int]) -> Tensor:
    return torch.eye(4)[experts] * 5.0


def test_routing_stats_summary_hand_checked():
    layer = stats_layer()
    layer(tokens_for([0, 0, 0, 1, 3, 3]))  # 6 tokens, capacity ceil(6/4) = 2; expert 0 drops 1
    s = layer.routing_stats.summary(reset=False)
    assert s["tokens_per_expert"] == [3, 1, 0, 2]
    assert s["drop_fraction"] == pytest.approx(1 / 6)
    assert s["max_over_min"] == float("inf")
    assert s["max_over_mean"] == pytest.approx(3 / 1.5)
    assert s["experts_used"] == pytest.approx(0.75)
    layer(tokens_for([0, 1, 2, 3, 3, 3]))  # accumulates: expert 3 drops 1
    s = layer.routing_stats.summary()
    assert s["tokens_per_expert"] == [4, 2, 1, 5]
    assert s["drop_fraction"] == pytest.approx(2 / 12)
    assert s["max_over_min"] == pytest.approx(5.0)
    assert s["max_over_mean"] == pytest.approx(5 / 3)
    assert s["experts_used"] == pytest.approx(1.0)
    s = layer.routing_stats.summary()  # reset by the previous call
    assert s["tokens_per_expert"] == [0, 0, 0, 0]
    assert s["drop_fraction"] == 0.0


def test_routing_stats_direct_record():
    stats = RoutingStats(3)
    stats.record(torch.tensor([4, 2, 2]), torch.tensor([3, 2, 2]))
    s = stats.summary()
    assert s == {"tokens_per_expert": [4, 2, 2], "drop_fraction": pytest.approx(1 / 8),
                 "max_over_min": pytest.approx(2.0), "max_over_mean": pytest.approx(4 / (8 / 3)),
                 "experts_used": pytest.approx(1.0)}


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_training_step_adam_reduces_toy_regression_loss(k):
    torch.manual_seed(12)
    layer = MoE(HID, None, 4, k=k, ffn_hidden_size=32, drop_tokens=False, use_rts=False,
                init_std=0.1)
    x = torch.randn(64, HID)
    target = torch.tanh(x @ torch.randn(HID, HID)) * 0.5
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gate_before = layer.router.wg.weight.detach().clone()
    losses = []
    for _ in range(60):
        out, l_aux, _ = layer(x)
        mse = F.mse_loss(out, target)
        loss = mse + 0.01 * l_aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses[:: 10]
    assert not torch.equal(layer.router.wg.weight, gate_before)  # the gate learns too


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=2, k=3), r"k=3 .*num_experts=2"),
    (dict(num_experts=6, ep_size=4), r"not divisible by ep_size=4"),
    (dict(num_experts=4, noisy_gate_policy="Gaussian"), r"unknown noisy_gate_policy 'Gaussian'"),
    (dict(num_experts=4, activation="tanh"), r"unknown activation 'tanh'"),
    (dict(num_experts=4, capacity_factor=0.0), r"capacity_factor must be positive"),
    (dict(num_experts=4, eval_capacity_factor=-1.0), r"eval_capacity_factor must be positive"),
    (dict(num_experts=4, drop_policy="lifo"), r"unknown drop_policy 'lifo'"),
    (dict(num_experts=4, score_func="tanh"), r"unknown score_func 'tanh'"),
])
def test_sparse_moe_layer_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(HID, None, **kwargs)


def test_sparse_moe_layer_hidden_size_mismatch_raises_value_error():
    layer = MoE(HID, None, 4, ffn_hidden_size=8)
    with pytest.raises(ValueError, match=rf"hidden size {HID + 1} .* built for {HID}"):
        layer(torch.randn(3, HID + 1))
