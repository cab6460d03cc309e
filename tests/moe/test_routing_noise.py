"""Keyed routing noise (moetrain.moe.routing_noise): uniform, Gumbel-max samples by the softmax, a function
of (seed, iteration, layer, stream, global token position) only, so a batch split into micro-batches routes
as one forward; no host sync (the compiled graph: tests/moe/test_moe_host_sync.py). Without a key the layer keeps
torch's RNG (DeepSpeed's draws)."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.moe import MoE
from moetrain.moe import routing_noise as rn
from moetrain.moe.routing_noise import KeyedNoise, routing_key
from tests.helpers import count_host_syncs

HIDDEN, EXPERTS, SEQ = 16, 4, 8
SHAPE = torch.Size([20000, 10])


def _uniforms(seed=1, iteration=3, first=0, layer=1, stream=rn.RTS, shape=SHAPE, training=True, seq=SEQ):
    key = routing_key(seed, iteration, first, "cpu", training=training)
    return KeyedNoise(key, layer, seq).uniform(shape, 0.0, 1.0, torch.device("cpu"), stream)


def test_modular_multiply_is_exact_without_overflow():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2 ** 32, (1000,), dtype=torch.long, generator=gen)
    for constant in (0x7FEB352D, 0x846CA68B, rn.MASK32):
        want = torch.tensor([(int(v) * constant) & rn.MASK32 for v in x])
        assert torch.equal(rn._mul32(x, constant), want)
        assert rn._mul32(int(x[0]), constant) == int(want[0])  # the same function on the host's ints
    assert len({rn.mix32(i) for i in range(4096)}) == 4096  # bijective: distinct counters, distinct hashes


def test_uniforms_are_in_the_open_interval_and_uniform():
    assert float(rn.uniform_from_bits(torch.tensor([0]))) > 0
    assert float(rn.uniform_from_bits(torch.tensor([rn.MASK32]))) < 1
    u = _uniforms().flatten().double()
    n = u.numel()
    # Kolmogorov-Smirnov: sup |F_n - F| below the 0.1% critical value 1.95 / sqrt(n)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ranks - u.sort().values, u.sort().values - (ranks - 1 / n)).max()
    assert ks < 1.95 / math.sqrt(n)
    # no structure along tokens or columns: neighbours uncorrelated (|r| < 5 sigma = 5 / sqrt(n))
    grid = _uniforms().double() - 0.5
    for a, b in ((grid[1:], grid[:-1]), (grid[:, 1:], grid[:, :-1])):
        corr = (a * b).mean() / (a.square().mean() * b.square().mean()).sqrt()
        assert abs(float(corr)) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("change", [dict(seed=2), dict(iteration=4), dict(layer=3), dict(stream=rn.JITTER),
                                    dict(training=False), dict(first=1)],
                         ids=["seed", "iteration", "layer", "stream", "eval", "sample"])
def test_every_key_component_gives_unrelated_draws(change):
    base = _uniforms().double() - 0.5
    other = _uniforms(**change).double() - 0.5
    if "first" in change:  # one sample later: the same draws, moved up by a sequence
        assert torch.equal(other[:-SEQ], base[SEQ:])
        return
    corr = (base * other).mean() / (base.square().mean() * other.square().mean()).sqrt()
    assert abs(float(corr)) < 5 / math.sqrt(base.numel())


def test_gumbel_max_samples_by_the_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, -3.0])
    tokens = 100_000
    key = routing_key(7, 0, 0, "cpu")
    noise = KeyedNoise(key, 0, 1).gumbel(torch.Size([tokens, 5]), torch.device("cpu"), rn.GUMBEL)
    assert torch.isfinite(noise).all()
    counts = torch.bincount(torch.argmax(logits + noise, dim=1), minlength=5).double()
    expected = torch.softmax(logits.double(), 0) * tokens
    chi2 = float(((counts - expected).square() / expected).sum())
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, 0.1% critical value


def _layer(**kwargs) -> MoE:
    torch.manual_seed(0)
    kwargs.setdefault("use_rts", False)
    kwargs.setdefault("top2_2nd_expert_sampling", False)
    return MoE(HIDDEN, num_experts=EXPERTS, ffn_hidden_size=24, min_capacity=1, layer_index=3, **kwargs).train()


RANDOM_MODES = {
    "second-expert-sampling-jitter": dict(k=2, top2_2nd_expert_sampling=True, noisy_gate_policy="Jitter"),
    "rsample": dict(k=1, noisy_gate_policy="RSample"),
}


@pytest.mark.parametrize("mode", list(RANDOM_MODES))
def test_a_batch_split_in_two_routes_as_one_forward(mode):
    """Dropless, so only the noise could make the halves differ: torch's RNG does, keyed noise does not (RTS
    is covered by the layout tests: its scores only matter under a capacity, which a split changes)."""
    layer = _layer(drop_tokens=False, **RANDOM_MODES[mode])
    x = torch.randn(4, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))

    def routed(key_of):
        halves = [layer(x[i:i + 2], routing_key=key_of(i))[0] for i in (0, 2)]
        return torch.cat(halves), layer(x, routing_key=key_of(0))[0]

    split, whole = routed(lambda first: routing_key(5, 2, first, "cpu"))
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    split, whole = routed(lambda first: None)
    assert not torch.allclose(split, whole, rtol=1e-6, atol=1e-7)


def test_keyed_draws_leave_torch_rng_alone_and_unkeyed_ones_use_it():
    layer = _layer(drop_tokens=False, **RANDOM_MODES["second-expert-sampling-jitter"])
    x = torch.randn(2, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))
    key = routing_key(5, 2, 0, "cpu")
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        keyed = layer(x, routing_key=key)[0]
        after = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(3))  # the keyed forward drew nothing from torch's RNG
        outputs.append((keyed, layer(x)[0]))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert not torch.allclose(outputs[0][1], outputs[1][1])  # DeepSpeed's mode follows torch's seed


@pytest.mark.parametrize("mode", ["rts-capacity", *RANDOM_MODES])
def test_keyed_forward_backward_never_syncs(mode):
    kwargs = dict(k=1, use_rts=True, capacity_factor=0.5) if mode == "rts-capacity" else RANDOM_MODES[mode]
    layer = _layer(**kwargs)
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    key = routing_key(5, 2, 6, "cpu")
    with count_host_syncs() as events:
        out, l_aux, _ = layer(x, routing_key=key)
        (out.square().sum() + l_aux).backward()
    assert dict(events) == {}
