"""benchmarks/train_throughput.py: its FLOP count against a hand count, and the GPU check's training
run (benchmarks/gpu_check.sh: h200 config, --bf16, the corpus loader) shrunk to run 2 steps on a CPU."""

from __future__ import annotations

import math

import pytest

from benchmarks.train_throughput import flops_per_token, main
from moetrain.config import Config
from moetrain.model import GPT


def test_flops_per_token_equals_a_hand_count():
    cfg = Config()
    m, moe = cfg.model, cfg.moe
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = \
        "llama", 2, 32, 4, 16, 100
    moe.num_experts, moe.expert_interval, moe.topk = [4], 2, 2  # layer 0 dense, layer 1 MoE (E=4, k=2)
    h, ffn, seq, experts, k = 32, 128, 16, 4, 2  # llama FFN: 8h/3 rounded up to 64
    attention = 4 * h * h  # q, k, v, out projections, no biases
    norms = 2 * h  # two RMSNorm weights per block
    dense_block = attention + norms + 3 * h * ffn  # SwiGLU: gate, up, down
    moe_block = attention + norms + experts * h + k * 3 * h * ffn  # router + the k routed experts
    padded_vocab = 128  # --make-vocab-size-divisible-by 128: the padding rows are computed, so counted
    head = padded_vocab * h  # tied with the embedding: counted once, as the output matmul; lookups are free
    n = dense_block + moe_block + h + head  # + final norm
    flops, counted_n, attention_flops = flops_per_token(GPT(m, moe), m)
    assert counted_n == n
    assert attention_flops == 12 * 2 * h * seq  # QK^T and AV, forward and backward, all T x T scores
    assert flops == 6 * n + 12 * 2 * h * seq


def test_gpu_check_training_run_on_cpu_with_a_tiny_config(tmp_path):
    (result,) = main(["--configs", "h200", "--device", "cpu", "--bf16", "--data", "corpus", "--no-peer",
                      "--warmup", "1", "--steps", "1", "--set", "model.num_layers=2", "model.hidden_size=64",
                      "model.num_attention_heads=4", "model.seq_length=32", "moe.num_experts=[4]",
                      "training.micro_batch_size=2", "data.tokenizer_type=byte", f"data.cache_dir={tmp_path}"])
    assert result["name"] == "h200" and len(result["steps"]) == 1
    assert result["tokens_per_s"] * result["step_s"] == pytest.approx(2 * 32)
    assert 0 < result["causal_mfu"] < result["mfu"] and math.isfinite(result["mfu"])
    assert result["peak_gib"] > 0
