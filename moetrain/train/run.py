"""`build_run(cfg)`: the order-sensitive wiring of one training run, in one place.

Order matters: validate before joining the job; seed before the data and the model; build the model on
the meta device (nothing allocated), shard it (pipeline stage, then tensor and expert parallel) and only
then materialise this rank's pieces on the device with keyed initial weights (the single-process values
for the seed, whatever the layout); initialise a student from its teacher (sharded alike) after that; make
the optimizer from the sharded parameters; and create process groups in the same order on every rank.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moetrain.checkpoint.api import with_checkpoint_vocab_padding
from moetrain.config import Config, resolve
from moetrain.data import Tokenizer, load_training_data
from moetrain.data.loader import TokenBatches
from moetrain.loss import LossFunction
from moetrain.mixed_precision import LOW_PRECISION, ComputeWeights, applies_to
from moetrain.model import GPT
from moetrain.parallel.data_parallel import GradSpec
from moetrain.parallel.fsdp import ShardingOptions
from moetrain.parallel.grad_sync import GradientSync
from moetrain.parallel.mesh import ParallelState, init_parallel, local_device
from moetrain.parallel.parallelize import parallelize
from moetrain.parallel.pipeline import split_for_pipeline, tied_embedding_params
from moetrain.parallel.zero import ZeroOptimizer
from moetrain.train.distill import DistillationLoss, Distiller
from moetrain.train.executor import LocalExecutor, PipelineExecutor
from moetrain.train.host_memory import keep_freed_memory
from moetrain.train.loss_scaler import LossScaler
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.optimizer import build_optimizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu")
    return local_device(name) if name == "cuda" else torch.device(name)


def set_numerics(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """TF32 for fp32 matmuls on CUDA (unless --no-tf32); deterministic kernels with --deterministic
    (cuBLAS needs its workspace size fixed before its first call, so this runs before any work)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything one training run is made of, wired; `Trainer` drives it."""

    cfg: Config
    device: torch.device
    parallel: ParallelState
    quiet: bool  # this process prints nothing (asked for, or not rank 0)
    tokenizer: Tokenizer
    train_data: TokenBatches
    valid_data: TokenBatches | None
    model: GPT  # this rank's share: a pipeline stage, tensor and expert shards
    param_counts: dict[str, int]  # of the whole model
    distiller: Distiller | None
    loss_function: LossFunction
    grad_specs: dict[nn.Parameter, GradSpec]
    optimizer: torch.optim.Optimizer | ZeroOptimizer  # AdamW, or the ZeroOptimizer around it
    grad_sync: GradientSync
    schedule: LRSchedule
    scaler: LossScaler | None
    accumulation: int
    executor: LocalExecutor  # or PipelineExecutor
    compute_weights: ComputeWeights | None  # bf16/fp16 copies of the GEMM weights (ZeRO 0-2), else None


def build_run(cfg: Config, *, quiet: bool = False) -> Run:
    """Join the job, load the data, build and shard the model (and a distillation teacher), make the optimizer."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world_size)  # before joining: bad flags fail at once
    tc = cfg.training
    device = resolve_device(tc.device)
    set_numerics(device, tc.tf32, tc.deterministic)
    if device.type == "cpu":
        keep_freed_memory()  # per-step activations and gradients reuse pages, not page faults
    state = init_parallel(cfg.parallel, device)
    quiet = quiet or state.rank != 0
    log: Callable[[str], None] = (lambda line: None) if quiet else print
    seed_everything(tc.seed)
    # every rank opens the data; the first to need a token cache writes it under a file lock while the
    # others wait on that lock (never in a collective, which would time out behind a long tokenization)
    tokenizer, train_data, valid_data = load_training_data(
        cfg.data.data_path, tokenizer_type=cfg.data.tokenizer_type, vocab_file=cfg.data.vocab_file,
        merge_file=cfg.data.merge_file, tokenizer_model=cfg.data.tokenizer_model,
        vocab_size=cfg.data.vocab_size, seq_length=cfg.model.seq_length, split=cfg.data.split, seed=tc.seed,
        cache_dir=cfg.data.cache_dir, text_key=cfg.data.json_keys, train_data_path=cfg.data.train_data_path,
        valid_data_path=cfg.data.valid_data_path)
    cfg = resolve(cfg, world_size, tokenizer.vocab_size)  # derived micro-batch, vocabulary
    if tc.load:
        cfg = with_checkpoint_vocab_padding(cfg, tc.load)  # its embedding rows, however it was padded
    tc = cfg.training
    with torch.device("meta"):  # nothing allocated: each rank materialises only its pieces, after sharding
        model = GPT(cfg.model, cfg.moe, seed=tc.seed)
    param_counts = model.parameter_counts()
    loss_function = LossFunction(cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff)
    distiller = Distiller(cfg, tokenizer, device, state, log=log) if cfg.distill.enabled else None
    if state.pp > 1:
        model = split_for_pipeline(model, state.pp, state.pp_rank)
    sharding = ShardingOptions.from_config(cfg.parallel, tc.precision, device) if cfg.parallel.zero_stage == 3 \
        else None
    grad_specs = parallelize(model, state, device, sharding)
    for param in tied_embedding_params(model):  # one weight, held by the first and the last stage
        spec = grad_specs[param]
        grad_specs[param] = dataclasses.replace(spec, copies=2 * spec.copies)
    if distiller is not None:
        if distiller.initialises_student:
            distiller.init_student(model)  # this rank's pieces of both, sharded alike
        if not state.is_last_stage:
            distiller.release_teacher()  # what init_student read: only the last stage, holding the logits, runs it
        loss_function = DistillationLoss(cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff, distiller)
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
    if cfg.parallel.zero_stage in (1, 2):
        optimizer = ZeroOptimizer(optimizer, grad_specs, cfg.parallel.zero_stage,
                                  offload=cfg.parallel.offload_optimizer, reduce_late=tied_embedding_params(model))
    schedule = LRSchedule(tc.lr, tc.min_lr, tc.warmup_iters(), tc.decay_iters(), tc.lr_decay_style)
    scaler = LossScaler.from_config(
        tc.loss_scale, tc.initial_scale_power, tc.loss_scale_window, tc.hysteresis,
        tc.min_loss_scale, tc.consecutive_hysteresis) if tc.precision == "fp16" else None
    accumulation = cfg.accumulation_steps(state.world_size)
    compute_weights = ComputeWeights(model, LOW_PRECISION[tc.precision]) \
        if applies_to(tc.precision, cfg.parallel.zero_stage) else None
    if tc.compile:
        for block in model.blocks:
            block.compile()  # regional: each block its own graph (the MoE routing's host syncs break it there)
    if state.pp > 1:
        executor = PipelineExecutor(model, loss_function, state, device, tc.precision, accumulation,
                                    tc.micro_batch_size, cfg.model.seq_length, cfg.parallel.pipeline_schedule,
                                    seed=tc.seed)
    else:
        executor = LocalExecutor(model, loss_function, state, device, tc.precision, accumulation, seed=tc.seed)
    return Run(cfg=cfg, device=device, parallel=state, quiet=quiet, tokenizer=tokenizer, train_data=train_data,
               valid_data=valid_data, model=model, param_counts=param_counts, distiller=distiller,
               loss_function=loss_function, grad_specs=grad_specs, optimizer=optimizer,
               grad_sync=GradientSync(grad_specs, optimizer, overlap=state.pp == 1,
                                      fully_sharded=model if sharding is not None and state.distributed else None,
                                      keep_gathered=sharding is not None and not sharding.reshard_after_forward
                                      and state.pp == 1),
               schedule=schedule, scaler=scaler,
               accumulation=accumulation, executor=executor, compute_weights=compute_weights)
