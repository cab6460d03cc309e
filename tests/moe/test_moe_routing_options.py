"""Megatron-Core / DeepSeek-V3 routing options against plain float64 references written here.

Each option is checked token by token against a loop, the balance losses against their published
formulas (Switch/GShard as Megatron forms it, DeepSeek-V2's sequence-wise loss, and the global-batch
form under 2-process data parallelism equal to one process on the whole batch).
"""

import math

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ConfigError, parse_train_args
from moetrain.moe import MoE
from moetrain.moe.balance import SINKHORN_ITERATIONS, sinkhorn
from moetrain.moe.router import Router
from moetrain.moe.routing_config import RoutingConfig
from tests.helpers import gloo_group, spawn

HIDDEN, EXPERTS = 8, 8


def _router(k: int, **kwargs) -> Router:
    torch.manual_seed(0)
    kwargs.setdefault("drop_tokens", False)
    return Router(HIDDEN, EXPERTS, RoutingConfig(k=k, router_dtype="fp64", **kwargs))


def _reference_route(router: Router, x: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Per token, in float64: scores, groups, top-k, weights, the way Megatron-Core describes them."""
    weight = router.wg.weight.double()
    bias = router.expert_bias.double() if router.expert_bias is not None else torch.zeros(EXPERTS, dtype=torch.float64)
    all_indices, all_weights = [], []
    routing = router.routing
    for token in x.double():
        logits = [float(token @ weight[e].detach()) for e in range(EXPERTS)]
        if routing.score_func == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            top = max(logits)
            total = sum(math.exp(v - top) for v in logits)
            scores = [math.exp(v - top) / total for v in logits]
        selection = [s + float(b) for s, b in zip(scores, bias)]
        allowed = range(EXPERTS)
        if routing.num_groups:
            size = EXPERTS // routing.num_groups
            groups = [selection[g * size:(g + 1) * size] for g in range(routing.num_groups)]
            if routing.score_func == "sigmoid":
                group_scores = [sum(sorted(group, reverse=True)[:2]) for group in groups]
            else:
                group_scores = [max(group) for group in groups]
            best = sorted(range(routing.num_groups), key=lambda g: -group_scores[g])[:routing.group_topk]
            allowed = [e for e in range(EXPERTS) if e // size in best]
        chosen = sorted(allowed, key=lambda e: -selection[e])[:routing.k]
        gates = [scores[e] for e in chosen]
        if routing.k > 1 and not routing.pre_softmax:
            gates = [g / sum(gates) for g in gates]
        gates = [g * (routing.topk_scaling_factor or 1.0) for g in gates]
        all_indices.append(chosen)
        all_weights.append(gates)
    return all_indices, all_weights


ROUTING_CASES = {
    "softmax-top2": dict(k=2),
    "pre-softmax-top2": dict(k=2, pre_softmax=True),
    "softmax-groups": dict(k=2, num_groups=4, group_topk=2),
    "sigmoid-groups-bias-scaled": dict(k=3, score_func="sigmoid", num_groups=4, group_topk=2, expert_bias=True,
                                       topk_scaling_factor=2.5),
    "sigmoid-top1-scaled": dict(k=1, score_func="sigmoid", topk_scaling_factor=2.5),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_matches_per_token_float64_loop(case):
    router = _router(**ROUTING_CASES[case])
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.linspace(-0.2, 0.2, EXPERTS))
    x = torch.randn(40, HIDDEN)
    decision = router(x)
    indices, weights = _reference_route(router, x)
    assert decision.expert_indices.tolist() == indices
    torch.testing.assert_close(decision.weights, torch.tensor(weights, dtype=decision.weights.dtype),
                               rtol=1e-12, atol=1e-12)


def test_group_limited_routing_never_leaves_the_chosen_groups():
    torch.manual_seed(1)
    for score_func in ("softmax", "sigmoid"):
        router = Router(HIDDEN, 16, RoutingConfig(k=4, drop_tokens=False, score_func=score_func, num_groups=8,
                                                  group_topk=2))
        x = torch.randn(500, HIDDEN) * 3
        decision = router(x)
        scores = router.compute_scores(router.compute_logits(x)).view(500, 8, 2)
        group_scores = scores.sum(2) if score_func == "sigmoid" else scores.amax(2)  # groups of 2: top-2 = sum
        best = group_scores.topk(2, dim=1).indices
        groups = decision.expert_indices // 2
        assert bool((groups.unsqueeze(2) == best.unsqueeze(1)).any(2).all())
        assert len(set(groups.flatten().tolist())) == 8  # different tokens do use every group


def test_groups_aligned_with_expert_parallel_ranks_bound_the_ranks_visited():
    torch.manual_seed(2)
    layer = MoE(HIDDEN, num_experts=16, k=4, ffn_hidden_size=8, drop_tokens=False, num_groups=4, group_topk=2)
    layer.ep_size, layer.num_local_experts = 4, 4  # the bookkeeping of 4 EP ranks of 4 experts (= groups)
    layer(torch.randn(64, HIDDEN))
    summary = layer.routing_stats.summary()
    assert summary["ep_ranks_per_token_max"] <= 2
    assert 1 <= summary["ep_ranks_per_token"] <= 2


def _probs(router: Router, x: torch.Tensor) -> torch.Tensor:
    return router.compute_scores(router.compute_logits(x)).detach()


def test_aux_loss_is_switch_gshard_with_all_k_counted():
    router = _router(k=3, load_balancing_type="aux_loss")
    x = torch.randn(50, HIDDEN)
    decision = router(x)
    probs = _probs(router, x)
    tokens = x.shape[0]
    expected = 0.0
    for e in range(EXPERTS):
        mean_prob = sum(float(probs[t, e]) for t in range(tokens)) / tokens
        fraction = sum(row.count(e) for row in decision.expert_indices.tolist()) / tokens
        expected += mean_prob * fraction
    expected *= EXPERTS / 3
    assert decision.l_aux.item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_for_top1_equals_deepspeeds():
    x = torch.randn(50, HIDDEN)
    megatron = _router(k=1, load_balancing_type="aux_loss")(x).l_aux
    deepspeed = _router(k=1)(x).l_aux
    torch.testing.assert_close(megatron, deepspeed)


def test_seq_aux_loss_is_deepseek_v2_sequence_wise_formula():
    torch.manual_seed(3)
    layer = MoE(HIDDEN, num_experts=EXPERTS, k=2, ffn_hidden_size=8, drop_tokens=False,
                top2_2nd_expert_sampling=False, load_balancing_type="seq_aux_loss", router_dtype="fp64")
    batch, seq = 3, 10
    x = torch.randn(batch, seq, HIDDEN)
    _, l_aux, _ = layer(x)
    decision = layer.router(x.reshape(-1, HIDDEN), (batch, seq))
    probs = _probs(layer.router, x.reshape(-1, HIDDEN)).view(batch, seq, EXPERTS)
    indices = decision.expert_indices.view(batch, seq, 2).tolist()
    per_sequence = []
    for b in range(batch):
        loss = 0.0
        for e in range(EXPERTS):
            f = EXPERTS / (2 * seq) * sum(choices.count(e) for choices in indices[b])  # N_r / (K_r T) * count
            p = sum(float(probs[b, t, e]) for t in range(seq)) / seq
            loss += f * p
        per_sequence.append(loss)
    expected = sum(per_sequence) / batch
    assert decision.balance_losses["seq_aux_loss"].item() == pytest.approx(expected, rel=1e-12)
    assert l_aux.item() == pytest.approx(expected, rel=1e-6)  # l_aux is float32
    assert set(layer.balance_losses) == {"seq_aux_loss"}


def test_combined_balance_losses_are_weighted_and_kept_apart():
    torch.manual_seed(4)
    layer = MoE(HIDDEN, num_experts=EXPERTS, k=2, ffn_hidden_size=8, drop_tokens=False,
                load_balancing_type=["aux_loss", "seq_aux_loss"], load_balancing_coeffs=[1.0, 0.25])
    _, l_aux, _ = layer(torch.randn(2, 12, HIDDEN))
    parts = layer.balance_losses
    torch.testing.assert_close(l_aux, parts["aux_loss"] + 0.25 * parts["seq_aux_loss"])
    assert parts["aux_loss"].item() != pytest.approx(parts["seq_aux_loss"].item())


def _two_rank_global_router(rank: int, port: int, run, results) -> None:
    """Rank `rank` of 2: a global_aux_loss router balanced over both ranks; results[rank] = run(router, rank)."""
    with gloo_group(rank, 2, port):
        router = _router(k=2, load_balancing_type="global_aux_loss")
        router.balance_group = dist.group.WORLD
        results[rank] = run(router, rank)


def _one_batch(router: Router, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's 20 rows of the global batch: l_aux and the gate's gradient."""
    loss = router(_global_batch()[rank * 20:(rank + 1) * 20]).l_aux
    loss.backward()
    return loss.detach(), router.wg.weight.grad.clone()


def _global_batch() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(40, HIDDEN)


def test_global_aux_loss_over_two_data_parallel_ranks_equals_one_process_on_the_whole_batch():
    results = spawn(_two_rank_global_router, 2, _one_batch)
    whole = _router(k=2, load_balancing_type="global_aux_loss")
    loss = whole(_global_batch()).l_aux
    loss.backward()
    mean_loss = (results[0][0] + results[1][0]) / 2  # data parallelism averages
    mean_grad = (results[0][1] + results[1][1]) / 2
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean_grad, whole.wg.weight.grad, rtol=1e-5, atol=1e-8)  # float32 parameter
    # and it is the plain aux_loss of the whole batch, which the local aux_loss of a half is not
    torch.testing.assert_close(loss, _router(k=2, load_balancing_type="aux_loss")(_global_batch()).l_aux)
    half = _router(k=2, load_balancing_type="aux_loss")(_global_batch()[:20]).l_aux
    assert half.item() != pytest.approx(loss.item(), rel=1e-6)


def _reference_global_batch_losses(weight: torch.Tensor, micro_batches: list[torch.Tensor], k: int) -> list:
    """Megatron-Core's global_aux_loss over the micro-batches of one step, per token in float64: micro-batch
    i is balanced against the assignments of micro-batches 1..i (constants), its own probabilities with grad."""
    assigned, tokens, losses = [0.0] * EXPERTS, 0, []
    for x in micro_batches:
        probs = torch.softmax(x.double() @ weight.t(), dim=1)
        for row in probs.detach():
            for e in sorted(range(EXPERTS), key=lambda e: -float(row[e]))[:k]:
                assigned[e] += 1
        tokens += x.shape[0]
        mean_prob = probs.mean(0)
        losses.append(sum(mean_prob[e] * (assigned[e] / tokens) for e in range(EXPERTS)) * EXPERTS / k)
    return losses


def _micro_batches() -> list[torch.Tensor]:
    torch.manual_seed(6)
    return [torch.randn(16, HIDDEN) + shift for shift in (0.0, 0.5, -0.5)]  # routed differently


def _accumulate(router: Router, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """One optimizer step's forward-backwards, each loss / N as the executor scales it."""
    router.start_global_batch()
    losses = []
    for x in micro_batches:
        loss = router(x).l_aux
        (loss / len(micro_batches)).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_global_aux_loss_accumulates_the_steps_micro_batches_as_megatron_does():
    router = _router(k=2, load_balancing_type="global_aux_loss")
    got = _accumulate(router, _micro_batches())
    weight = router.wg.weight.detach().double().requires_grad_()
    want = _reference_global_batch_losses(weight, _micro_batches(), k=2)
    (sum(want) / len(want)).backward()
    torch.testing.assert_close(got.double(), torch.stack(want).detach(), rtol=1e-6, atol=0)  # fp32 l_aux
    torch.testing.assert_close(router.wg.weight.grad.double(), weight.grad, rtol=1e-6, atol=1e-9)
    # not the per-micro-batch loss it was before: later micro-batches see the earlier counts
    alone = [_router(k=2, load_balancing_type="global_aux_loss")(x).l_aux.item() for x in _micro_batches()]
    assert alone[0] == pytest.approx(got[0].item(), rel=1e-7)
    assert alone[2] != pytest.approx(got[2].item(), rel=1e-4)
    # the next step starts afresh; evaluation and an unopened step count one forward alone
    router.zero_grad()
    torch.testing.assert_close(_accumulate(router, _micro_batches()), got, rtol=0, atol=0)
    router.eval()
    assert router(_micro_batches()[2]).l_aux.item() == pytest.approx(alone[2], rel=1e-7)


def test_global_aux_loss_accumulation_compiles_into_one_graph():
    """The running counts and the constant-fraction node compile whole (fullgraph) and match eager."""
    def run(compiled: bool) -> torch.Tensor:
        router = _router(k=2, load_balancing_type="global_aux_loss")
        torch._dynamo.reset()
        module = torch.compile(router, fullgraph=True) if compiled else router
        router.start_global_batch()
        losses = []
        for x in _micro_batches():
            loss = module(x).l_aux
            loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses), router.wg.weight.grad

    (got, got_grad), (want, want_grad) = run(True), run(False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)


def _accumulated(router: Router, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's 8 rows of each of the 3 micro-batches: their l_aux and the gate's accumulated gradient."""
    losses = _accumulate(router, [x[rank * 8:(rank + 1) * 8] for x in _micro_batches()])
    return losses, router.wg.weight.grad.clone()


def test_global_aux_loss_with_accumulation_over_two_ranks_equals_one_process():
    """DP 2 x 3 micro-batches of 8 rows == 1 process x 3 micro-batches of both ranks' 16 rows."""
    results = spawn(_two_rank_global_router, 2, _accumulated)
    whole = _router(k=2, load_balancing_type="global_aux_loss")
    losses = _accumulate(whole, _micro_batches())
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, losses, rtol=1e-6, atol=0)  # fp32 l_aux
    torch.testing.assert_close((results[0][1] + results[1][1]) / 2, whole.wg.weight.grad, rtol=1e-5, atol=1e-8)


def test_global_aux_loss_accumulation_survives_activation_recomputation():
    """A recomputed forward replays the router after its own counts were added: the loss keeps the
    fraction it was formed with and the running counts are put back."""
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import GPT

    def step(granularity):
        torch.manual_seed(0)
        cfg = ModelConfig(style="llama", num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                          vocab_size=32, recompute_granularity=granularity)
        model = GPT(cfg, MoEConfig(num_experts=[4], expert_interval=1, topk=2, drop_tokens=False,
                                   load_balancing_type=["global_aux_loss"])).train()
        for _, moe in model.moe_layers():
            moe.router.start_global_batch()
        ids = torch.randint(0, 32, (3, 2, 8), generator=torch.Generator().manual_seed(1))
        for batch in ids:
            model(batch, batch.roll(-1, 1)).aux_loss.backward()
        return ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                [moe.router.global_counts.clone() for _, moe in model.moe_layers()])

    want_grads, want_counts = step(None)
    got_grads, got_counts = step("full")
    assert int(want_counts[0][-1]) == 3 * 2 * 8
    for a, b in zip(got_counts, want_counts):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def _reference_sinkhorn(logits: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Sinkhorn-Knopp iterated to convergence, float64."""
    cost = torch.exp(logits.double())
    row, col = torch.ones(cost.shape[0], dtype=torch.float64), torch.ones(cost.shape[1], dtype=torch.float64)
    for _ in range(10000):
        row = 1 / (cost.shape[0] * (cost @ col))
        new_col = 1 / (cost.shape[1] * (row @ cost))
        done = (new_col - col).abs().max() < tol
        col = new_col
        if done:
            break
    return cost * row.unsqueeze(1) * col


def test_sinkhorn_routing_picks_the_balanced_top1_and_weighs_it_by_sigmoid():
    router = _router(k=1, load_balancing_type="sinkhorn")
    x = torch.randn(64, HIDDEN)
    logits = router.compute_logits(x)
    decision = router(x)
    expected = _reference_sinkhorn(logits).argmax(1, keepdim=True)
    assert torch.equal(decision.expert_indices, expected)
    torch.testing.assert_close(decision.weights, torch.sigmoid(logits).gather(1, expected))
    assert decision.l_aux.item() == 0.0
    balanced = sinkhorn(logits)
    torch.testing.assert_close(balanced.sum(0), torch.full((EXPERTS,), 1 / EXPERTS, dtype=torch.float64))
    router.eval()  # evaluation routes by the plain scores
    assert torch.equal(router(x).expert_indices, logits.argmax(1, keepdim=True))


def test_input_jitter_scales_the_router_input_in_training_only():
    router = _router(k=2, input_jitter_eps=0.1)
    x = torch.randn(30, HIDDEN)
    torch.manual_seed(6)
    jittered = router.compute_logits(x)
    torch.manual_seed(6)
    noise = 0.9 + torch.rand(x.shape) * 0.2
    torch.testing.assert_close(jittered, (x * noise).double() @ router.wg.weight.double().t(), rtol=1e-6, atol=1e-6)
    router.eval()
    torch.testing.assert_close(router.compute_logits(x), x.double() @ router.wg.weight.double().t())


def test_router_dtype_fp64_and_fp32_under_autocast():
    x = torch.randn(16, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _router(k=2).compute_logits(x).dtype == torch.float64
        decision = Router(HIDDEN, EXPERTS, RoutingConfig(k=2, drop_tokens=False))(x)
    assert decision.weights.dtype == torch.float32 and decision.l_aux.dtype == torch.float32


def test_shared_expert_width_and_sigmoid_gate():
    torch.manual_seed(7)
    layer = MoE(HIDDEN, num_experts=4, k=2, ffn_hidden_size=8, drop_tokens=False, shared_expert_ffn_size=24,
                shared_expert_gate=True, top2_2nd_expert_sampling=False)
    assert layer.shared_experts.fc2.weight.shape == (HIDDEN, 24)
    x = torch.randn(10, HIDDEN)
    out = layer(x)[0]
    shared = layer.shared_experts(x) * torch.sigmoid(x @ layer.shared_expert_gate.weight.t())
    layer.shared_experts = None
    torch.testing.assert_close(out, layer(x)[0] + shared)


BAD_ROUTING = {
    "groups do not divide": (dict(k=2, num_groups=3, group_topk=1), "does not divide the 8 experts"),
    "group topk above groups": (dict(k=2, num_groups=4, group_topk=5), "between 1 and the 4 groups"),
    "k above reachable experts": (dict(k=5, num_groups=4, group_topk=2), "exceeds the 4 experts of the 2 chosen"),
    "groups without group topk": (dict(k=2, num_groups=4), "needs both"),
    "sinkhorn top2": (dict(k=2, load_balancing_type="sinkhorn"), "top-1 only"),
    "pre-softmax top1 with bias": (dict(k=1, pre_softmax=True, expert_bias=True), "drop the pre-softmax"),
    "pre-softmax with sigmoid": (dict(k=2, pre_softmax=True, score_func="sigmoid"), "applies to softmax"),
    "unknown balance type": (dict(k=2, load_balancing_type="switch"), "unknown load-balancing type"),
    "coefficients per type": (dict(k=2, load_balancing_type=["aux_loss", "seq_aux_loss"],
                                   load_balancing_coeffs=[1.0]), "one coefficient per type"),
    "router dtype": (dict(k=2, router_dtype="bf16"), "unknown router dtype"),
}


@pytest.mark.parametrize("case", list(BAD_ROUTING))
def test_bad_routing_options_raise_one_line_errors(case):
    kwargs, message = BAD_ROUTING[case]
    with pytest.raises(ValueError, match=message) as error:
        Router(HIDDEN, EXPERTS, RoutingConfig(**kwargs))
    assert "\n" not in str(error.value)


def test_megatron_flags_map_to_the_same_options_and_are_validated():
    cfg = parse_train_args([
        "--num-experts", "16", "--moe-router-topk", "4", "--moe-router-score-function", "sigmoid",
        "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
        "--moe-router-load-balancing-type", "seq_aux_loss", "aux_loss",
        "--moe-router-load-balancing-coeffs", "1", "0.5", "--moe-router-num-groups", "4",
        "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "2.5", "--moe-aux-loss-coeff", "0.001",
        "--moe-token-drop-policy", "probs", "--moe-expert-capacity-factor", "1.5", "--moe-input-jitter-eps", "0.01",
        "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate", "--moe-router-dtype", "fp64"])
    moe = cfg.moe
    assert (moe.topk, moe.score_func, moe.expert_bias, moe.expert_bias_update_rate) == (4, "sigmoid", True, 0.01)
    assert moe.load_balancing_type == ["seq_aux_loss", "aux_loss"] and moe.load_balancing_coeffs == [1.0, 0.5]
    assert (moe.num_groups, moe.group_topk, moe.topk_scaling_factor) == (4, 2, 2.5)
    assert (moe.aux_loss_coeff, moe.drop_policy, moe.train_capacity_factor) == (0.001, "probs", 1.5)
    assert (moe.input_jitter_eps, moe.shared_expert_ffn_size, moe.shared_expert_gate, moe.router_dtype) == (
        0.01, 64, True, "fp64")
    cfg.validate()
    with pytest.raises(ConfigError, match="--moe-router-group-topk 5"):
        parse_train_args(["--num-experts", "16", "--moe-router-num-groups", "4", "--moe-router-group-topk", "5"]
                         ).validate()
    with pytest.raises(ConfigError, match="--moe-shared-expert-gate needs a shared expert"):
        parse_train_args(["--moe-shared-expert-gate"]).validate()


PADDING_CASES = {
    "capacity-position-top2": dict(k=2, drop_policy="position"),
    "capacity-probs-top2": dict(k=2, drop_policy="probs"),
    "capacity-deepspeed-top4": dict(k=4),
    "dropless-sigmoid-bias-megatron-losses": dict(k=2, drop_tokens=False, score_func="sigmoid", expert_bias=True,
                                                  load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"]),
    "sinkhorn": dict(k=1, drop_tokens=False, load_balancing_type="sinkhorn"),
}


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_masking_all_padding_equals_running_without_the_padded_rows(case):
    def layer():
        torch.manual_seed(8)
        return MoE(HIDDEN, num_experts=EXPERTS, ffn_hidden_size=8, capacity_factor=1.0, min_capacity=1,
                   use_rts=False, top2_2nd_expert_sampling=False, **PADDING_CASES[case])

    torch.manual_seed(9)
    real = torch.randn(2, 10, HIDDEN)
    padded = torch.cat([real, torch.randn(2, 3, HIDDEN) * 5], dim=1)  # 3 padding rows after each sequence
    mask = torch.arange(13) < 10
    plain, masked = layer(), layer()
    want = plain(real, with_z_loss=True)
    got = masked(padded, with_z_loss=True, token_mask=mask.expand(2, 13))
    torch.testing.assert_close(got.output[:, :10], want.output)
    assert bool((got.output[:, 10:] == 0).all())  # padding reaches no expert
    for name in ("l_aux", "z_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    assert torch.equal(got.exp_counts, want.exp_counts)
    assert masked.routing_stats.summary() == plain.routing_stats.summary()
    if masked.router.expert_bias is not None:
        assert torch.equal(masked.router.pending_load, plain.router.pending_load)
    if case.startswith("capacity"):
        decision = plain.router(real.reshape(-1, HIDDEN), (2, 10))
        assert not bool(decision.kept.all())  # the capacity limit does drop: padding must not take slots


def test_gpt_token_mask_makes_right_padding_invisible_to_routing():
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import GPT

    torch.manual_seed(10)
    model = GPT(ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=16, vocab_size=50),
                MoEConfig(num_experts=[4], expert_interval=1, topk=2, min_capacity=1, top2_2nd_expert_sampling=False,
                          load_balancing_type=["aux_loss", "seq_aux_loss"])).eval()
    ids = torch.randint(0, 50, (3, 10))
    padded = torch.cat([ids, torch.randint(0, 50, (3, 6))], dim=1)
    want = model(ids)
    got = model(padded, token_mask=(torch.arange(16) < 10).expand(3, 16))
    torch.testing.assert_close(got.logits[:, :10], want.logits)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    unmasked = model(padded)  # without the mask the padding takes capacity and changes the real tokens' outputs
    assert not torch.allclose(unmasked.logits[:, :10], want.logits)


def _spread_logits(scale: float) -> torch.Tensor:
    """256 tokens x 8 experts whose rows sit at very different heights (max ~27 at scale 1), as a trained
    gate's logits do: a row far below the batch's largest logit must still be normalised."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 8, generator=generator) * torch.rand(256, 1, generator=generator) * 8
    return (logits + torch.randn(256, 1, generator=generator) * 6) * scale


@pytest.mark.parametrize("logits,iterations", [
    (torch.tensor([[41.0, 40.0], [0.0, 1.0], [-1.0, -0.5], [-3.0, 1.0]]), SINKHORN_ITERATIONS),
    (_spread_logits(1.0), SINKHORN_ITERATIONS),
    (_spread_logits(10.0), 500),
], ids=["issue-4-tokens", "spread", "spread-sharp-gate"])
def test_sinkhorn_matches_exact_float64_sinkhorn_on_spread_logits(logits, iterations):
    balanced = sinkhorn(logits, iterations=iterations)
    assert torch.isfinite(balanced).all()
    assert torch.equal(balanced.argmax(1), _reference_sinkhorn(logits).argmax(1))
    torch.testing.assert_close(balanced.sum(1), torch.full((logits.shape[0],), 1 / logits.shape[0]))


def test_sinkhorn_gives_padding_rows_no_mass():
    logits = _spread_logits(1.0)[:16]
    mask = torch.arange(16) % 3 != 0
    balanced = sinkhorn(logits, mask)
    assert torch.equal(balanced[~mask], torch.zeros_like(balanced[~mask]))
    torch.testing.assert_close(balanced[mask], sinkhorn(logits[mask]))
