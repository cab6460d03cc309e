"""The one module of shared test helpers: a tiny corpus, a tiny trainable config, a free TCP port for process
groups, processes spawned as ranks (a gloo group of their own, or a config run as torchrun would launch it),
the parallel-layout runner that compares a layout with one process, and the host-sync counter.

One intra-op thread per test process: the suite runs tiny models, where a second thread only
adds synchronisation (a tiny forward took 8 ms with 1 thread, 0.5 s with 2 on a busy 2-core box)."""

import collections
import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config import Config
from moetrain.moe import MoE
from moetrain.parallel.pieces import model_pieces
from moetrain.train.trainer import Trainer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]  # the repository
FIXTURES = ROOT / "tests" / "fixtures"  # checkpoints from earlier versions, sample eval tasks
TEXT = "the quick brown fox jumps over the lazy dog. " * 12  # 540 bytes per document


def write_corpus(root) -> str:
    """Five .txt documents: with split 80,20 four train and one validation document."""
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(TEXT)
    return str(corpus)


def tiny_config(tmp_path, *, save="run", **training) -> Config:
    """A 2-layer MoE on the tiny byte-level corpus that trains in seconds on a CPU; `training` overrides
    TrainingConfig fields."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 16
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 1, 1
    cfg.data.data_path = [write_corpus(tmp_path)]
    cfg.data.tokenizer_type = "byte"
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.split = "80,20,0"
    t = cfg.training
    t.micro_batch_size, t.train_iters, t.lr, t.lr_warmup_iters = 4, 6, 3e-3, 0
    t.eval_interval, t.eval_iters, t.log_interval = 0, 2, 1
    t.save = str(tmp_path / save) if save else None
    t.device, t.progress_bar = "cpu", False
    for key, value in training.items():
        setattr(t, key, value)
    return cfg


def read_records(save_dir):
    """The records of a run's metrics.jsonl."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    """A TCP port free right now, for a process group's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This (spawned) process as `rank` of a `world`-process gloo group on 127.0.0.1:`port`, destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable, world: int, *args: Any) -> dict:
    """`worker(rank, port, *args, results)` in `world` spawned processes (a module-level function, so it
    pickles); `results`, the dict they fill, as a plain dict."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), *args, results), nprocs=world, join=True)
    return dict(results)


def run_ranks(work: Callable[[Config], Any], cfg: Config, world: int) -> dict[int, Any]:
    """rank -> `work(cfg)` on each of `world` spawned processes, launched as torchrun launches `moetrain train`
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) with one thread each; `work` is a module-level function."""
    return spawn(_run_rank, world, work, world, cfg.to_dict())


def _run_rank(rank: int, port: int, work: Callable[[Config], Any], world: int, cfg_dict: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        results[rank] = work(Config.from_dict(cfg_dict))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Parallel layouts against one process
# ---------------------------------------------------------------------------------------------
# random routing modes: DeepSpeed's top-2 default (second-expert sampling) with Jitter, dropless; top-1 with
# random token selection and RSample under a capacity limit
RANDOM_ROUTING = {
    "sampling": dict(topk=2, top2_2nd_expert_sampling=True, noisy_gate_policy="Jitter", drop_tokens=False),
    "rts": dict(topk=1, use_rts=True, noisy_gate_policy="RSample", drop_tokens=True),
}


def parallel_config(tmp_path, *, style="llama", drop_tokens=False, routing: str | None = None, **parallel) -> Config:
    """A 4-layer MoE every other layer, 3 steps, global batch 8, `parallel` setting ParallelConfig fields."""
    cfg = tiny_config(tmp_path, save=None, train_iters=3, lr_decay_style="constant", clip_grad=0.05)
    cfg.model.style = style
    cfg.model.num_layers = 4
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 2, 2
    cfg.moe.drop_tokens, cfg.moe.use_rts, cfg.moe.top2_2nd_expert_sampling = drop_tokens, False, False
    for key, value in RANDOM_ROUTING.get(routing, {}).items():
        setattr(cfg.moe, key, value)
    cfg.moe.train_capacity_factor, cfg.moe.min_capacity = 1.0, 1
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 8
    cfg.training.eval_iters = 3
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def _train_rank(cfg: Config) -> dict:
    """One rank's training run: its losses, final eval loss and the pieces of its model."""
    trainer = Trainer(cfg, quiet=True)
    result = trainer.fit()
    pieces = {g: (t.clone(), p) for g, t, p in model_pieces(trainer.model).values()}
    return {"losses": result.losses, "eval": result.final_eval_loss, "pieces": pieces}


def run_parallel(cfg: Config, world: int) -> dict:
    """rank -> its losses, final eval loss and model pieces, `cfg` trained on `world` processes."""
    return run_ranks(_train_rank, cfg, world)


def reference(cfg: Config) -> tuple[list[float], float | None, dict[str, torch.Tensor]]:
    """`cfg` trained by one process: losses, final eval loss, state dict."""
    single = Config.from_dict(cfg.to_dict())
    single.parallel.tensor_parallel_size = single.parallel.pipeline_parallel_size = 1
    single.parallel.expert_parallel_size, single.parallel.zero_stage = None, 0
    single.parallel.offload_optimizer = False
    trainer = Trainer(single, quiet=True)
    result = trainer.fit()
    return result.losses, result.final_eval_loss, {k: v.detach() for k, v in trainer.model.state_dict().items()}


def select(full: torch.Tensor, piece) -> torch.Tensor:
    """The part of a whole tensor that a rank's piece holds."""
    return full if piece.dim is None else full.index_select(piece.dim, torch.tensor(piece.index))


# ---------------------------------------------------------------------------------------------
# Host synchronisation, counted on the CPU
# ---------------------------------------------------------------------------------------------
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::bincount"}
HOST_COPY_METHODS = ("tolist", "item", "cpu", "numpy", "__bool__")


class _SyncOpCounter(TorchDispatchMode):
    def __init__(self, events: collections.Counter) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS:
            self.events[name] += 1
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.events["aten::repeat_interleave without output_size"] += 1  # sums on the host
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """Yields a Counter of host-synchronising calls made inside the block (autograd's backward
    included: it runs on this thread for CPU tensors)."""
    events: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def spy(name):
        def method(self, *args, **kwargs):
            events[f"Tensor.{name}"] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in HOST_COPY_METHODS:
        setattr(torch.Tensor, name, spy(name))
    try:
        with _SyncOpCounter(events):
            yield events
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# every single-device routing mode (MoE keyword arguments), run by the host-sync and CUDA tests
ROUTING_MODES = {
    "dropless": dict(k=2, drop_tokens=False),
    "capacity-position": dict(k=2, drop_policy="position"),
    "capacity-probs": dict(k=2, drop_policy="probs"),
    "capacity-random": dict(k=2, drop_policy="random"),
    "capacity-unordered": dict(k=1, drop_policy="unordered"),
    "k4-probs": dict(k=4),
    "rts": dict(k=1, use_rts=True),
    "rts-dropless": dict(k=1, use_rts=True, drop_tokens=False),
    "jitter": dict(k=1, noisy_gate_policy="Jitter"),
    "rsample": dict(k=1, noisy_gate_policy="RSample"),
    "second-expert-sampling": dict(k=2, top2_2nd_expert_sampling=True),
    "expert-bias": dict(k=2, expert_bias=True),
    "sigmoid": dict(k=2, score_func="sigmoid"),
    "shared-experts": dict(k=2, num_shared_experts=1),
    "residual": dict(k=1, use_residual=True),
    "bias-gelu": dict(k=2, ffn_bias=True, activation="gelu"),
    "megatron-aux-losses": dict(k=2, load_balancing_type=["aux_loss", "seq_aux_loss", "global_aux_loss"]),
    "sinkhorn": dict(k=1, load_balancing_type="sinkhorn"),
    "group-limited-sigmoid-bias": dict(k=2, score_func="sigmoid", num_groups=4, group_topk=2, expert_bias=True,
                                       topk_scaling_factor=2.5),
    "pre-softmax-jitter": dict(k=2, pre_softmax=True, input_jitter_eps=0.01),
    "router-fp64": dict(k=2, router_dtype="fp64"),
    "gated-shared-expert": dict(k=2, shared_expert_ffn_size=24, shared_expert_gate=True),
    "pad-to-capacity": dict(k=2, pad_expert_input_to_capacity=True, ffn_bias=True),
}


def routing_mode_layer(hidden: int, ffn: int, experts: int, **kwargs: Any) -> MoE:
    """A seeded MoE with SwiGLU experts and DeepSpeed's random routing (RTS, second-expert sampling) off unless
    `kwargs` (a ROUTING_MODES entry plus sizes) turns it on."""
    torch.manual_seed(0)
    kwargs = {"use_rts": False, "top2_2nd_expert_sampling": False, "activation": "swiglu", **kwargs}
    return MoE(hidden, num_experts=experts, ffn_hidden_size=ffn, **kwargs)
