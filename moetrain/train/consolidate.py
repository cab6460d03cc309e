"""Consolidate: a checkpoint of any layout merged into a single-process one (whole tensors, torch optimizer
state). Here, beside the training run's optimizer, because the merged optimizer state is laid out as
`build_optimizer` groups the parameters."""

from __future__ import annotations

import os

from moetrain.checkpoint.api import TOKENIZER_FILE, saved_config
from moetrain.checkpoint.layout import optimizer_param_names
from moetrain.checkpoint.reader import CheckpointReader, load_into
from moetrain.checkpoint.rng import rank_rng_state
from moetrain.checkpoint.storage import resolve_checkpoint_dir, save_checkpoint
from moetrain.config import ParallelConfig
from moetrain.model import GPT
from moetrain.train.optimizer import build_optimizer


def consolidate(load_dir: str, out_dir: str) -> str:
    """Merge a checkpoint of any layout into a single-process one: whole tensors, torch optimizer state."""
    reader = CheckpointReader(resolve_checkpoint_dir(load_dir))
    extra = dict(reader.state["extra"])
    cfg = saved_config(extra["config"])
    cfg.parallel = ParallelConfig()  # the result is a one-process checkpoint
    model = GPT(cfg.model, cfg.moe)
    tc = cfg.training
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
    load_into(reader, model, optimizer)
    extra.update(config=cfg.to_dict(), rng=rank_rng_state(extra, 0, 1),
                 optimizer_param_names=optimizer_param_names(model, optimizer))
    extra.pop("rng_per_rank", None)
    tokenizer = os.path.join(reader.path, TOKENIZER_FILE)
    files = {}
    if os.path.isfile(tokenizer):
        with open(tokenizer, encoding="utf-8") as f:
            files[TOKENIZER_FILE] = f.read()
    return save_checkpoint(out_dir, int(reader.state["iteration"]), model_state=model.state_dict(),
                           optimizer_state=optimizer.state_dict(), extra=extra, files=files)

