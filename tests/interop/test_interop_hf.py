"""Hugging Face export and import against transformers itself, on tiny random models made on the fly:
every supported layout loads as its native class with moetrain's logits, round trips give back the same
weights, imports of transformers-made models (grouped-query attention, untied output, sliding window)
give transformers' logits, unsupported options are refused in one line, and an import fine-tunes."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex

import numpy
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetrain.checkpoint import load_model
from moetrain.cli import main
from moetrain.config import Config, parse_train_args
from moetrain.data import Tokenizer, build_tokenizer
from moetrain.interop import export_hf, import_hf, save_model_checkpoint, train_command
from moetrain.model import GPT
from moetrain.train.trainer import Trainer
from tests.helpers import reference, run_parallel, write_corpus

transformers.logging.set_verbosity_error()
# torch's note when transformers builds an exported Qwen2-MoE's empty shared expert
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
VOCAB = 257  # the byte tokenizer: 256 bytes + <|endoftext|>
SEQ = 64


def tiny_llama_config(*, layers: int = 3, model: dict | None = None, **moe) -> Config:
    cfg = Config()
    m = cfg.model
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = "llama", layers, 32, 4, SEQ
    m.vocab_size, m.rope_theta, m.norm_eps = VOCAB, 5000.0, 1e-6
    for key, value in (model or {}).items():
        setattr(m, key, value)
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 1, 2
    cfg.moe.drop_tokens, cfg.moe.top2_2nd_expert_sampling = False, False
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def make_checkpoint(path, cfg: Config, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = GPT(cfg.model, cfg.moe)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            if layer.router.expert_bias is not None:  # as after training: a bias that changes selection
                layer.router.expert_bias.normal_(0.0, 0.05)
            layer.router.wg.weight.normal_(0.0, 0.5)  # decisive routing: no near-ties between experts
        for name, param in model.named_parameters():
            if name.endswith(("qkv.bias", "q_norm.weight", "k_norm.weight")):  # not their zero / one start
                param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    save_model_checkpoint(str(path), cfg, model.state_dict(), build_tokenizer("byte"))
    return str(path)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within 1e-4 relative to the largest logit (float32)."""
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def compare(model, hf_model, lengths=(1, 7, SEQ)) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in lengths:
            tokens = torch.randint(0, VOCAB, (2, length), generator=generator)
            assert_same_logits(model(tokens).logits, hf_model(tokens).logits)


MLA = {"multi_latent_attention": True, "kv_lora_rank": 10, "qk_head_dim": 6, "qk_pos_emb_head_dim": 4,
       "v_head_dim": 5}
LAYOUTS = {
    "mixtral": ({}, "MixtralForCausalLM"),
    "mixtral-top3-untied": ({"topk": 3}, "MixtralForCausalLM"),
    "qwen2-moe-top1": ({"topk": 1}, "Qwen2MoeForCausalLM"),
    "qwen2-moe-interleaved": ({"expert_interval": 2, "layers": 4}, "Qwen2MoeForCausalLM"),
    "qwen2-moe-dense-slot": ({"num_experts": [4, 0, 4]}, "Qwen2MoeForCausalLM"),
    "qwen2-moe-gated-shared": ({"shared_expert_ffn_size": 24, "shared_expert_gate": True}, "Qwen2MoeForCausalLM"),
    "qwen2-moe-pre-softmax": ({"topk": 3, "pre_softmax": True}, "Qwen2MoeForCausalLM"),
    "ernie-shared": ({"num_shared_experts": 1, "expert_interval": 2, "layers": 4}, "Ernie4_5_MoeForCausalLM"),
    "ernie-expert-bias": ({"expert_bias": True}, "Ernie4_5_MoeForCausalLM"),
    "llama-dense": ({"num_experts": [1]}, "LlamaForCausalLM"),
    "llama-grouped-query": ({"num_experts": [1], "model": {"num_query_groups": 2}}, "LlamaForCausalLM"),
    "qwen3-moe": ({"model": {"qk_norm": "head", "num_query_groups": 2, "kv_channels": 16},
                   "moe_layer_freq": [0, 1, 1]}, "Qwen3MoeForCausalLM"),
    "qwen3-moe-pre-softmax": ({"model": {"qk_norm": "head"}, "pre_softmax": True}, "Qwen3MoeForCausalLM"),
    "olmoe": ({"model": {"qk_norm": "projection", "num_query_groups": 2}, "pre_softmax": True}, "OlmoeForCausalLM"),
    "glm4-moe": ({"model": {"qk_norm": "head", "rotary_percent": 0.5, "num_query_groups": 2, "add_qkv_bias": True},
                  "moe_layer_freq": [0, 1, 1], "score_func": "sigmoid", "expert_bias": True, "num_shared_experts": 1,
                  "num_groups": 2, "group_topk": 1, "topk_scaling_factor": 2.5}, "Glm4MoeForCausalLM"),
    "glm4-moe-no-shared": ({"model": {"rotary_percent": 0.5}, "score_func": "sigmoid"}, "Glm4MoeForCausalLM"),
    "deepseek-v3": ({"model": MLA | {"q_lora_rank": 12}, "moe_layer_freq": [0, 1, 1], "score_func": "sigmoid",
                     "expert_bias": True, "num_shared_experts": 1, "num_groups": 2, "group_topk": 1,
                     "topk_scaling_factor": 2.5}, "DeepseekV3ForCausalLM"),
    "deepseek-v2": ({"model": MLA, "pre_softmax": True, "num_shared_experts": 2}, "DeepseekV2ForCausalLM"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_loads_natively_with_equal_logits_and_round_trips(tmp_path, layout):
    options, architecture = LAYOUTS[layout]
    cfg = tiny_llama_config(**options)
    cfg.model.tie_embeddings = layout != "mixtral-top3-untied"
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg)
    out = str(tmp_path / "hf")
    assert export_hf(ckpt, out) == architecture
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == architecture
    model, _, _ = load_model(ckpt)
    compare(model, hf_model)

    back_cfg, _ = import_hf(out, str(tmp_path / "back"))
    back, _, saved_cfg = load_model(str(tmp_path / "back"))
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[name], tensor) for name, tensor in original.items())
    # the same layer layout and routing, not just the same tensors
    fields = {"model": ("num_layers", "tie_embeddings", "rope_theta", "norm_eps", "num_query_groups", "kv_channels",
                        "qk_norm", "rotary_percent", "add_qkv_bias", *MLA, "q_lora_rank"),
              "moe": ("topk", "num_shared_experts", "expert_bias", "drop_tokens", "pre_softmax", "shared_expert_gate",
                      "score_func", "num_groups", "group_topk", "topk_scaling_factor") if cfg.moe.is_moe else ()}
    for section, names in fields.items():
        for name in names:
            assert getattr(getattr(saved_cfg, section), name) == getattr(getattr(cfg, section), name)
    assert saved_cfg.experts_per_layer() == cfg.experts_per_layer() == back_cfg.experts_per_layer()
    compare(back, hf_model, lengths=(5,))


def test_tokenizer_travels_both_ways(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_llama_config())
    out = str(tmp_path / "hf")
    export_hf(ckpt, out)
    text = "def f(x):\n    return x + 1  # héllo <|endoftext|>"
    ours = Tokenizer.load(os.path.join(ckpt, "iter_0000000", "tokenizer.json"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == ours.eos_id
    import_hf(out, str(tmp_path / "back"))
    _, back_tokenizer, _ = load_model(str(tmp_path / "back"))
    assert back_tokenizer.encode(text) == ours.encode(text) and back_tokenizer.eos_id == ours.eos_id


def save_hf_model(path, config, model=None) -> None:
    """A transformers-made model with random weights (or `model`), and a tokenizer whose end-of-text token is </s>."""
    torch.manual_seed(0)
    model = model if model is not None else transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer = build_tokenizer("byte")
    backend = __import__("tokenizers").Tokenizer.from_str(tokenizer.to_json().replace("<|endoftext|>", "</s>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(path)


def mixtral_config(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=SEQ, tie_word_embeddings=False, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=256)
    return transformers.MixtralConfig(**(settings | overrides))


def test_import_of_transformers_mixtral_with_grouped_query_attention(tmp_path):
    hf_dir = str(tmp_path / "mixtral")
    save_hf_model(hf_dir, mixtral_config())
    cfg, _ = import_hf(hf_dir, str(tmp_path / "ckpt"))
    assert cfg.experts_per_layer() == [4, 4] and cfg.moe.topk == 2 and not cfg.moe.drop_tokens
    assert not cfg.model.tie_embeddings and cfg.model.ffn_hidden_size == 48
    model, tokenizer, _ = load_model(str(tmp_path / "ckpt"))
    assert tokenizer.eos_id == 256  # "</s>" ends documents in a Mixtral-style tokenizer
    compare(model, transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval())


def random_biases(model) -> None:
    """Selection biases and attention biases that matter (transformers starts them at zero)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("e_score_correction_bias", "proj.bias")):
                tensor.normal_(0.0, 0.05 if "correction" in name else 0.5)


SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4}, eos_token_id=256)
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16}
LATENT = dict(num_key_value_heads=4, n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
              topk_group=1, first_k_dense_replace=1, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
              v_head_dim=5)
FAMILIES = {  # tiny random configs of the open MoE families, as their Hub configs set them
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=16, head_dim=16,
                                                     norm_topk_prob=True, mlp_only_layers=[0]),
    "qwen3_moe-unnormalised": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=16,
                                                                  norm_topk_prob=False, decoder_sparse_step=1),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, num_experts=4, norm_topk_prob=False),
    "qwen3_moe-yarn": lambda: transformers.Qwen3MoeConfig(
        **SMALL | {"rope_parameters": YARN}, num_experts=4, moe_intermediate_size=16, norm_topk_prob=True),
    "llama-llama3": lambda: transformers.LlamaConfig(**SMALL | {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0}}),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **SMALL | {"rope_parameters": YARN | {"partial_rotary_factor": 0.5, "mscale": 1.0, "mscale_all_dim": 0.5}},
        n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, head_dim=16),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **SMALL | {"rope_parameters": YARN | {"mscale": 0.707, "mscale_all_dim": 0.707}} | LATENT, q_lora_rank=None,
        topk_method="group_limited_greedy", routed_scaling_factor=2.0),
    "deepseek_v2-lite-top1": lambda: transformers.DeepseekV2Config(**SMALL | {"num_experts_per_tok": 1} | LATENT,
                                                                   q_lora_rank=None),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **SMALL | {"rope_parameters": YARN | {"mscale": 1.0, "mscale_all_dim": 1.0}} | LATENT, q_lora_rank=12,
        routed_scaling_factor=2.5, norm_topk_prob=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_open_moe_families_import_with_transformers_logits_and_export_back(tmp_path, family):
    hf_dir = str(tmp_path / "hf")
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    random_biases(hf_model)
    save_hf_model(hf_dir, hf_model.config, hf_model)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    import_hf(hf_dir, str(tmp_path / "ckpt"))
    model, _, _ = load_model(str(tmp_path / "ckpt"))
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf_model(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4
    compare(model, hf_model)
    out = str(tmp_path / "back")
    assert export_hf(str(tmp_path / "ckpt"), out) == type(hf_model).__name__
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.model_type == hf_model.config.model_type
    compare(exported, hf_model)  # DeepSeek-V3 goes out with rope_interleave false: other rows, the same function


PARALLEL_LAYOUTS = {"ep2": {"expert_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}
QUICK_LAYOUTS = {("qwen3_moe", "ep2"), ("olmoe", "pp2"), ("glm4_moe", "ep2"), ("deepseek_v2", "pp2"),
                 ("deepseek_v3", "ep2")}  # each class in one layout; the rest of the matrix is marked slow


@pytest.mark.parametrize("family, layout", [
    pytest.param(family, layout, id=f"{family}-{layout}", marks=() if (family, layout) in QUICK_LAYOUTS
                 else pytest.mark.slow)
    for family in ("qwen3_moe", "olmoe", "glm4_moe", "deepseek_v2", "deepseek_v3") for layout in PARALLEL_LAYOUTS])
def test_imported_open_moe_trains_and_loads_under_expert_and_pipeline_parallel(tmp_path, family, layout):
    """5 steps from the import lower the loss; EP 2 or PP 2 starts from the same weights: the same first loss
    (a function of every logit) as one process."""
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    save_hf_model(hf_dir, FAMILIES[family]())
    cfg, _ = import_hf(hf_dir, ckpt)
    argv = shlex.split(train_command(ckpt, cfg))[2:]
    cfg = parse_train_args(argv + ["--data-path", write_corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"),
                                   "--split", "80,20,0", "--micro-batch-size", "2", "--global-batch-size", "8",
                                   "--train-iters", "5", "--lr", "3e-3", "--lr-warmup-iters", "0", "--eval-iters", "1",
                                   "--eval-interval", "0", "--seq-length", "16", "--max-position-embeddings",
                                   str(SEQ), "--no-save", "--device", "cpu", "--no-progress-bar"])
    losses, _, _ = reference(cfg)
    assert losses[-1] < losses[0]
    cfg.training.train_iters = 1
    for key, value in PARALLEL_LAYOUTS[layout].items():
        setattr(cfg.parallel, key, value)
    for rank, result in run_parallel(cfg, 2).items():
        assert result["losses"][0] == pytest.approx(losses[0], rel=1e-5), rank


def test_import_caps_a_sliding_window_at_the_sequence_length_it_matches(tmp_path):
    hf_dir = str(tmp_path / "mixtral")
    save_hf_model(hf_dir, mixtral_config(sliding_window=16))
    with pytest.warns(UserWarning, match="sliding window of 16 tokens"):
        cfg, _ = import_hf(hf_dir, str(tmp_path / "ckpt"))
    assert cfg.model.seq_length == 16
    model, _, _ = load_model(str(tmp_path / "ckpt"))
    compare(model, transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(), lengths=(3, 16))


REFUSED = {
    "gpt style": ({"style": "gpt"}, "GPT-style"),
    "residual": ({"mlp_type": "residual"}, "residual MoE"),
    "pyramid": ({"num_experts": [4, 8, 4]}, "pyramid expert counts"),
    "sigmoid top-1": ({"score_func": "sigmoid", "topk": 1}, "sigmoid routing"),
    "dropping": ({"drop_tokens": True}, "capacity dropping.*--dropless"),
    "sampling": ({"top2_2nd_expert_sampling": True}, "second-expert sampling.*--dropless"),
    "top-1 shared": ({"topk": 1, "num_shared_experts": 1}, "top-1 routing with shared experts"),
    "group-limited": ({"num_groups": 2, "group_topk": 1}, "group-limited routing"),
    "scaling factor": ({"topk_scaling_factor": 2.5}, "top-k scaling factor"),
    "gated shared with bias": ({"shared_expert_ffn_size": 8, "shared_expert_gate": True, "expert_bias": True},
                               "no selection bias"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_export_refuses_what_no_hugging_face_class_computes(tmp_path, case):
    options, message = REFUSED[case]
    cfg = tiny_llama_config(**{k: v for k, v in options.items() if k != "style"})
    cfg.model.style = options.get("style", "llama")
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg)
    with pytest.raises(ValueError, match=message) as error:
        export_hf(ckpt, str(tmp_path / "hf"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "hf")


def test_dropless_exports_a_capacity_model_as_plain_top_k(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_llama_config(drop_tokens=True, top2_2nd_expert_sampling=True))
    out = str(tmp_path / "hf")
    assert export_hf(ckpt, out, dropless=True) == "MixtralForCausalLM"
    model, _, _ = load_model(ckpt)
    for _, layer in model.moe_layers():  # what the export promises: the same model without dropping or sampling
        layer.router.routing = dataclasses.replace(layer.router.routing, drop_tokens=False,
                                                   top2_2nd_expert_sampling=False)
    compare(model, transformers.AutoModelForCausalLM.from_pretrained(out).eval())


def test_import_refusals_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(str(tmp_path), str(tmp_path / "out"))
    top1 = str(tmp_path / "top1")
    save_hf_model(top1, mixtral_config(num_experts_per_tok=1))
    with pytest.raises(ValueError, match="top-1 routing with renormalised weights"):
        import_hf(top1, str(tmp_path / "out"))
    gated = str(tmp_path / "gated")
    save_hf_model(gated, transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        shared_expert_intermediate_size=16, qkv_bias=False))
    cfg, _ = import_hf(gated, str(tmp_path / "gated-ckpt"))  # Qwen2-MoE's gated shared expert imports
    assert cfg.moe.shared_expert_gate and cfg.moe.shared_expert_ffn_size == 16
    hf_gated = transformers.AutoModelForCausalLM.from_pretrained(gated).eval()
    compare(load_model(str(tmp_path / "gated-ckpt"))[0], hf_gated, lengths=(5,))
    os.remove(os.path.join(top1, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        import_hf(top1, str(tmp_path / "out"))


UNSUPPORTED = {"gpt_oss": "sinks", "granitemoe": "embedding_multiplier", "phimoe": "router_jitter_noise",
               "llama4_text": "layer_types", "jamba": "layer_types",
               "qwen3_next": "layer_types"}


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_import_refuses_other_moe_classes_naming_the_field(tmp_path, model_type):
    transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(build_tokenizer("byte").to_json())
    with pytest.raises(ValueError, match=UNSUPPORTED[model_type]) as error:
        import_hf(str(tmp_path), str(tmp_path / "out"))
    assert "\n" not in str(error.value) and "cannot represent" in str(error.value)


def test_cli_export_import_generate_eval_and_one_line_errors(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_llama_config())
    out = str(tmp_path / "hf")
    for argv in (["export", "--load", ckpt, "--format", "hf", "--out", out],
                 ["import", "--from-hf", out, "--out", str(tmp_path / "back")],
                 ["generate", "--load", str(tmp_path / "back"), "--max-new-tokens", "3", "--prompt", "ab"],
                 ["eval", "--load", str(tmp_path / "back"), "--ppl", write_corpus(tmp_path), "--limit", "1",
                  "--no-progress-bar", "--output", str(tmp_path / "eval.json")]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
    assert "moetrain train --load" in capsys.readouterr().out
    for argv, message in ((["export", "--load", ckpt, "--out", out], "not empty"),
                          (["import", "--from-hf", out, "--out", str(tmp_path / "back")], "already holds checkpoints"),
                          (["import", "--from-hf", out, "--out", str(tmp_path / "b2"), "--topk", "1"],
                           "drop the DeepSpeed options")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exited.value.code == 1 and message in err and "\n" not in err


def test_imported_model_fine_tunes_with_the_printed_command(tmp_path):
    hf_dir = str(tmp_path / "mixtral")
    save_hf_model(hf_dir, mixtral_config(max_position_embeddings=16))
    ckpt = str(tmp_path / "ckpt")
    cfg, _ = import_hf(hf_dir, ckpt)
    argv = shlex.split(train_command(ckpt, cfg))[2:]
    tuned = parse_train_args(argv + ["--data-path", write_corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"),
                                     "--split", "80,20,0", "--micro-batch-size", "2", "--train-iters", "2",
                                     "--lr-warmup-iters", "0", "--eval-iters", "1", "--save", str(tmp_path / "tuned"),
                                     "--device", "cpu"])
    tuned.training.progress_bar = False
    trainer = Trainer(tuned, quiet=True)
    assert trainer.iteration == 0
    start, _, _ = load_model(ckpt)
    assert all(torch.equal(trainer.model.state_dict()[name], tensor) for name, tensor in start.state_dict().items())
    result = trainer.fit()
    assert result.iteration == 2 and all(math.isfinite(loss) for loss in result.losses)


def test_import_refuses_a_pickled_pytorch_model_bin_unless_trusted(tmp_path, capsys):
    hf_dir = tmp_path / "mixtral"
    save_hf_model(str(hf_dir), mixtral_config())
    weights = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict()
    os.remove(hf_dir / "model.safetensors")
    torch.save({**weights, "training_state": numpy.float64(1.0)}, hf_dir / "pytorch_model.bin")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["import", "--from-hf", str(hf_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 1 and err.startswith("moetrain import: error: the weights in ")
    assert "pass --trust-checkpoint" in err and "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["import", "--from-hf", str(hf_dir), "--out", str(tmp_path / "out"), "--trust-checkpoint"])
    assert exited.value.code == 0
