"""Weights-only moetrain checkpoints: what import and upcycling write, and how to train on from them.

Such a checkpoint is a fresh start, not a paused run: iteration 0, no optimizer state, no data position or
RNG state. `moetrain train --load` initialises the model from it and starts the schedule, the optimizer and
the data order anew.
"""

from __future__ import annotations

import os
import shlex

import torch
from torch import Tensor

from moetrain.checkpoint.storage import iter_dir_name, list_checkpoints, save_checkpoint
from moetrain.config import Config, ModelConfig, to_flags
from moetrain.data import Tokenizer
from moetrain.model import GPT


def check_new_checkpoint_dir(out_dir: str) -> None:
    """Refuse to write into a directory that already holds checkpoints (checked before any slow work)."""
    if list_checkpoints(out_dir):
        raise ValueError(f"--out {out_dir} already holds checkpoints; write to a new directory")


def save_model_checkpoint(out_dir: str, cfg: Config, model_state: dict[str, Tensor], tokenizer: Tokenizer) -> str:
    """Write `model_state` (moetrain names) with its config and tokenizer as `out_dir/iter_0000000`.

    The state must fit `GPT(cfg)` exactly (checked on the meta device, so nothing is allocated): a
    converter bug surfaces here as a ValueError instead of as a checkpoint that fails to load later.
    An embedding and LM head of `cfg.model.vocab_size` rows are padded with zero rows to the padded
    vocabulary (--make-vocab-size-divisible-by; those rows are never predicted).
    """
    check_new_checkpoint_dir(out_dir)
    cfg.validate()
    model_state = pad_vocab_rows(model_state, cfg.model.padded_vocab_size())
    with torch.device("meta"):
        model = GPT(cfg.model, cfg.moe)
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"converted weights do not fit the moetrain model ({detail})") from None
    state = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in model_state.items()}
    if cfg.model.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]  # stored once, re-tied on load
    return save_checkpoint(out_dir, 0, model_state=state, optimizer_state={},
                           extra={"config": cfg.to_dict()}, files={"tokenizer.json": tokenizer.to_json()})


def pad_vocab_rows(state: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """`state` with its embedding and LM head padded with zero rows to `rows`."""
    def padded(weight: Tensor) -> Tensor:
        missing = rows - weight.shape[0]
        return torch.cat([weight, weight.new_zeros(missing, *weight.shape[1:])]) if missing > 0 else weight

    return {name: padded(tensor) if name in ("tok_emb.weight", "lm_head.weight") else tensor
            for name, tensor in state.items()}


def vocab_padding(vocab: int, rows: int) -> int:
    """The --make-vocab-size-divisible-by that pads `vocab` tokens to an embedding of `rows` rows: the
    default 128 where it does, else `rows` itself."""
    default = ModelConfig().make_vocab_size_divisible_by
    return default if -(-vocab // default) * default == rows else rows


def train_flags(cfg: Config) -> list[str]:
    """The `moetrain train` flags that rebuild cfg's model and MoE layers: those whose value is not the default."""
    return to_flags(cfg, ("model", "moe"))


def train_command(out_dir: str, cfg: Config) -> str:
    """The command that fine-tunes / continues training a checkpoint written by save_model_checkpoint."""
    tokenizer = os.path.join(out_dir, iter_dir_name(0), "tokenizer.json")
    words = ["moetrain", "train", "--load", out_dir, *train_flags(cfg),
             "--tokenizer-type", "json", "--vocab-file", tokenizer]
    return shlex.join(words)
