"""load_model: a checkpoint back as the model it was trained with, its weights and its tokenizer."""

from __future__ import annotations

import os

from moetrain.config import Config
from moetrain.data import Tokenizer
from moetrain.model import GPT
from moetrain.train.checkpoint import load_checkpoint


def load_model(load_dir: str, device: str = "cpu") -> tuple[GPT, Tokenizer, Config]:
    """Rebuild the model a checkpoint was trained with, its weights, and its tokenizer."""
    ckpt = load_checkpoint(load_dir)
    cfg = Config.from_dict(ckpt.extra["config"])
    tokenizer_path = os.path.join(ckpt.path, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"{ckpt.path} has no tokenizer.json; was it written by `moetrain train`?")
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:  # fewer is fine: a padded (e.g. Megatron) vocabulary
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{cfg.model.vocab_size}; put back the tokenizer.json this checkpoint was saved with")
    model = GPT(cfg.model, cfg.moe)
    model.load_state_dict(ckpt.model_state)
    return model.to(device).eval(), tokenizer, cfg
