"""One way in and out: `save` and `restore` pick the format, `load_model` rebuilds a trained model
(`read_model_config` reads just its config and tokenizer).

A checkpoint is single-process (model.safetensors + state.pt, bit-exact resume in one process) when
one process holds the whole model and optimizer, and sharded (index.json + one shard per rank) when
several processes or ZeRO hold parts of them; either format loads into any layout.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moetrain.checkpoint.integrity import read_manifest, verify_file
from moetrain.checkpoint.layout import OPTIMIZER_PARAM_NAMES, optimizer_param_names
from moetrain.checkpoint.reader import CheckpointReader, load_into, load_model_into
from moetrain.checkpoint.rng import capture_rng_state, rank_rng_state
from moetrain.checkpoint.sharded import save_sharded
from moetrain.checkpoint.storage import CheckpointError, load_state, resolve_checkpoint_dir, save_checkpoint
from moetrain.config import Config, ConfigError
from moetrain.data import Tokenizer
from moetrain.model import GPT
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.pieces import local
from moetrain.parallel.zero import ZeroOptimizer

TOKENIZER_FILE = "tokenizer.json"


def _sharded(state: ParallelState, optimizer) -> bool:
    """Whether this run's state is spread over processes (or ZeRO shares), so only the sharded format holds it."""
    return state.distributed or isinstance(optimizer, ZeroOptimizer)


def save(save_dir: str, iteration: int, model: nn.Module, optimizer, state: ParallelState, *, extra: dict,
         files: dict[str, str] | None = None, keep_last: int | None = None) -> str:
    """Atomically write this run's checkpoint for `iteration` (every rank calls it); return its path.

    `extra` (data position, config, loss scaler, ...) is the same on every rank; each rank's RNG
    state is added here. Non-finite weights are never written: a diverged run keeps its last good checkpoint.
    """
    if not _weights_finite(model, state):
        raise CheckpointError(f"refusing to save iteration {iteration} to {save_dir}: the weights hold NaN or inf; "
                              f"the last good checkpoint stays `latest`")
    if _sharded(state, optimizer):
        return save_sharded(save_dir, iteration, model, optimizer, extra, capture_rng_state(), state,
                            keep_last, files)
    extra = {**extra, "rng": capture_rng_state(), OPTIMIZER_PARAM_NAMES: optimizer_param_names(model, optimizer)}
    return save_checkpoint(save_dir, iteration, model_state=model.state_dict(),
                           optimizer_state=optimizer.state_dict(), extra=extra, keep_last=keep_last, files=files)


def _weights_finite(model: nn.Module, state: ParallelState) -> bool:
    """Whether every rank's parameters are finite (one collective, at save time only)."""
    flags = [local(p.detach()).isfinite().all() for p in model.parameters()]
    finite = torch.stack(flags).all().float() if flags else torch.ones(())
    if state.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


@dataclass
class Restored:
    """What `restore` read besides the tensors it loaded."""

    path: str
    iteration: int
    extra: dict
    fresh_start: bool  # weights only (an import or upcycle): optimizer, schedule and data start afresh
    rng: dict | None  # this rank's saved RNG state (None for a fresh start)


def restore(load_dir: str, model: nn.Module, optimizer, state: ParallelState, *,
            load_optimizer: bool = True) -> Restored:
    """Load a checkpoint of any layout into this rank's model and optimizer (`load_optimizer` False: the
    model only, the optimizer left as it is).

    Same layout in one process: loaded as saved (bit-exact). Otherwise each rank reads its pieces.
    """
    reader = CheckpointReader(resolve_checkpoint_dir(load_dir), optimizer=load_optimizer)
    extra = reader.state["extra"]
    fresh_start = "data" not in extra
    if not load_optimizer:
        load_model_into(reader, model)
    elif reader.sharded or _sharded(state, optimizer):
        load_into(reader, model, optimizer)
    else:
        try:
            model.load_state_dict(reader.model_state())
        except RuntimeError as error:
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise ConfigError(f"checkpoint {reader.path} does not fit this model ({detail}); resume with the "
                              "model and MoE flags it was trained with") from None
        if not fresh_start:
            optimizer.load_state_dict(reader.state["optimizer"])
    rng = None if fresh_start else rank_rng_state(extra, state.rank, state.world_size)
    return Restored(reader.path, int(reader.state["iteration"]), extra, fresh_start, rng)


def saved_config(data: dict) -> Config:
    """The Config a checkpoint saved (`extra["config"]`). One written before --make-vocab-size-divisible-by
    existed has an unpadded embedding: its padding multiple is 1, not today's default."""
    model = data.get("model", {})
    if "make_vocab_size_divisible_by" not in model:
        data = {**data, "model": {**model, "make_vocab_size_divisible_by": 1}}
    return Config.from_dict(data)


def with_checkpoint_vocab_padding(cfg: Config, load_dir: str) -> Config:
    """`cfg` with the vocabulary padding of the checkpoint it loads (the embedding's rows are part of the
    model's shape, so a resumed run, or one started from imported weights, keeps them); unchanged when
    `load_dir` holds no checkpoint yet."""
    try:
        path = resolve_checkpoint_dir(load_dir)
    except FileNotFoundError:
        return cfg
    stored = saved_config(load_state(path, mmap=True)["extra"]["config"]).model.make_vocab_size_divisible_by
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, make_vocab_size_divisible_by=stored))


def read_model_config(load_dir: str) -> tuple[Config, Tokenizer]:
    """The config a checkpoint (of any layout) was trained with and its tokenizer; no tensor is read."""
    path = resolve_checkpoint_dir(load_dir)
    cfg = saved_config(load_state(path, mmap=True)["extra"]["config"])
    tokenizer_path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}; was it written by `moetrain train`?")
    manifest = read_manifest(path)
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except Exception:
        verify_file(path, TOKENIZER_FILE, manifest)  # a damaged file: say so in one line
        raise
    if tokenizer.vocab_size > cfg.model.vocab_size:  # fewer is fine: a padded (e.g. Megatron) vocabulary
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{cfg.model.vocab_size}; put back the {TOKENIZER_FILE} this checkpoint was saved with")
    verify_file(path, TOKENIZER_FILE, manifest)
    return cfg, tokenizer


ROTATION_RETRIES = 3


def load_model(load_dir: str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, Config]:
    """Rebuild the whole model a checkpoint (of any layout) was trained with, its weights, and its tokenizer.

    `latest` is resolved once per attempt; when a running job rotates that checkpoint away while it is read
    (its directory is gone), `latest` is read again, at most ROTATION_RETRIES times."""
    for attempt in range(ROTATION_RETRIES + 1):
        path = resolve_checkpoint_dir(load_dir)
        try:
            cfg, tokenizer = read_model_config(path)
            model = GPT(cfg.model, cfg.moe, seed=0)  # the weights are loaded over it
            model.load_state_dict(CheckpointReader(path, verify_extra_files=False, optimizer=False).model_state())
            return model.to(device).eval(), tokenizer, cfg
        except (FileNotFoundError, CheckpointError):
            if os.path.isdir(path) or attempt == ROTATION_RETRIES:
                raise
