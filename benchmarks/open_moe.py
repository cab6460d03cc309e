"""Open MoE families in and out, and Multi-head Latent Attention's training step against standard attention.

1. For each transformers class moetrain imports (tiny random configs built here: 3 layers, hidden 32, 4
   experts top-2, GQA, the class's own features switched on), the largest absolute difference between
   moetrain's logits after `import` and transformers' own float32 forward, and between the exported
   directory loaded back by `from_pretrained` and the original, on 2 x 64 random tokens.
2. One training step (forward, backward, AdamW) of a llama-style MoE model with standard attention and the
   same model with MLA sized to the same parameter count, interleaved step by step on the same random
   batches so both see the same machine load; medians.

    python benchmarks/open_moe.py                 # both parts, 3 warm-up + 10 timed steps each
    python benchmarks/open_moe.py --steps 4       # a quicker timing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moetrain.config import Config  # noqa: E402
from moetrain.model import GPT  # noqa: E402

VOCAB, SEQ = 257, 64


def family_configs(transformers) -> dict:
    """model type -> a tiny random config with the class's distinguishing features on."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
                eos_token_id=256)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}
    latent = dict(num_key_value_heads=4, n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
                  n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=10, qk_nope_head_dim=6,
                  qk_rope_head_dim=4, v_head_dim=5)
    return {
        "qwen3_moe": transformers.Qwen3MoeConfig(**base, num_experts=4, moe_intermediate_size=16, head_dim=16,
                                                 norm_topk_prob=True, mlp_only_layers=[0]),
        "olmoe": transformers.OlmoeConfig(**base, num_experts=4, norm_topk_prob=False),
        "glm4_moe": transformers.Glm4MoeConfig(
            **base, rope_parameters=yarn | {"partial_rotary_factor": 0.5}, n_routed_experts=4,
            moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
            first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, head_dim=16),
        "deepseek_v2": transformers.DeepseekV2Config(**base | latent, q_lora_rank=None, rope_parameters=yarn | {
            "mscale": 0.707, "mscale_all_dim": 0.707}, topk_method="group_limited_greedy", routed_scaling_factor=2.0),
        "deepseek_v3": transformers.DeepseekV3Config(**base | latent, q_lora_rank=12, rope_parameters=yarn | {
            "mscale": 1.0, "mscale_all_dim": 1.0}, routed_scaling_factor=2.5),
    }


def logit_differences() -> None:
    import tokenizers
    import transformers

    from moetrain.checkpoint import load_model
    from moetrain.data import build_tokenizer
    from moetrain.interop import export_hf, import_hf

    transformers.logging.set_verbosity_error()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    print("| class | import: max abs logit diff | export -> from_pretrained: max abs diff | max abs logit |")
    print("|---|---|---|---|")
    for config in family_configs(transformers).values():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            hf_model = transformers.AutoModelForCausalLM.from_config(config)
            with torch.no_grad():  # decisive routing and non-zero biases, as a trained model has
                for key, tensor in hf_model.state_dict().items():
                    if key.endswith("gate.weight"):
                        tensor.normal_(0.0, 0.5)
                    elif key.endswith(("e_score_correction_bias", "proj.bias")):
                        tensor.normal_(0.0, 0.05)
            hf_model.save_pretrained(f"{tmp}/hf")
            backend = tokenizers.Tokenizer.from_str(build_tokenizer("byte").to_json())
            transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
                f"{tmp}/hf")
            import_hf(f"{tmp}/hf", f"{tmp}/ckpt")
            export_hf(f"{tmp}/ckpt", f"{tmp}/back")
            model = load_model(f"{tmp}/ckpt")[0].eval()
            back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/back").eval()
            with torch.no_grad():
                theirs = hf_model.eval()(tokens).logits
                ours, exported = model(tokens).logits, back(tokens).logits
            print(f"| {type(hf_model).__name__} | {(ours - theirs).abs().max():.2e} | "
                  f"{(exported - theirs).abs().max():.2e} | {theirs.abs().max():.2f} |")


def attention_models(args) -> dict[str, GPT]:
    """Standard attention and MLA at the same parameter count (the kv latent width chosen to match)."""
    def build(meta: bool = False, **attention) -> GPT:
        cfg = Config()
        m = cfg.model
        m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = "llama", 4, args.hidden, 8, 256
        m.vocab_size = 4096
        cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [8], 1, 2
        cfg.moe.drop_tokens, cfg.moe.top2_2nd_expert_sampling = False, False
        for key, value in attention.items():
            setattr(m, key, value)
        cfg.validate()
        if meta:  # counting parameters only: nothing allocated
            with torch.device("meta"):
                return GPT(m, cfg.moe, seed=0)
        return GPT(m, cfg.moe, seed=0)

    standard = build()
    target = sum(p.numel() for p in standard.parameters())
    head = args.hidden // 8
    latent = dict(multi_latent_attention=True, qk_head_dim=head, qk_pos_emb_head_dim=head // 2,
                  v_head_dim=head)  # DeepSeek-V3's proportions: 128 + 64 and 128
    sizes = {rank: sum(p.numel() for p in build(True, **latent, kv_lora_rank=rank).parameters())
             for rank in range(8, 4 * args.hidden, 8)}
    rank = min(sizes, key=lambda r: abs(sizes[r] - target))
    return {"standard": standard, f"MLA (kv_lora_rank {rank})": build(**latent, kv_lora_rank=rank)}


def step_times(args) -> None:
    models = attention_models(args)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    generator = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, 4096, (8, 257), generator=generator)
        order = list(models) if step % 2 == 0 else list(reversed(models))
        for name in order:
            start = time.perf_counter()
            loss = models[name](batch[:, :-1], batch[:, 1:].contiguous()).lm_loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["standard"])
    print("| attention | parameters | median step (s) | vs standard |")
    print("|---|---|---|---|")
    for name, model in models.items():
        median = statistics.median(times[name])
        print(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {median:.3f} | {median / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--skip-logits", action="store_true")
    args = parser.parse_args()
    if not args.skip_logits:
        logit_differences()
        print()
    step_times(args)


if __name__ == "__main__":
    main()
