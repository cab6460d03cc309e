"""Every tensor the trainer hands to a collective lives on the communication device it declared.

NCCL takes only GPU tensors, and this machine has no GPU, so the test simulates the host/device split
on the CPU: while training, a tensor that would sit on the host under CUDA is marked (made by a factory
without `device=`, moved with `.cpu()`, or computed only from such tensors; as on CUDA, an op with any
device input, or `.to(device)`, gives a device tensor), and the patched collectives reject marked
tensors and any tensor whose device differs from `ParallelState.comm_device`. A DP 2 and a PP 2 run
train and evaluate under it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from moetrain.config import Config
from moetrain.parallel.data_parallel import global_grad_norm
from moetrain.train.trainer import Trainer
from tests.helpers import free_port, tiny_config

HOST_MARK = "_simulated_host_tensor"
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.scalar_tensor, torch.linspace, torch.eye}
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_to_all_single", "send", "recv")  # isend, irecv: through batch_isend_irecv


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _on_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, HOST_MARK, False)


def _moves_to_a_device(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args)


class SimulatedHost(TorchFunctionMode):
    """Marks the tensors that would live on the host were the training device a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and _moves_to_a_device(args[1:], kwargs):
            for tensor in _tensors(out):  # on CUDA a new tensor on the device; on the CPU often the same
                setattr(tensor, HOST_MARK, False)
            return out
        else:
            inputs = _tensors((args, kwargs))
            host = bool(inputs) and all(_on_host(t) for t in inputs)
        if host:
            for tensor in _tensors(out):
                setattr(tensor, HOST_MARK, True)
        return out


def _checked(original, name: str, device: torch.device, seen: list[str]):
    def collective(*args, **kwargs):
        for tensor in _tensors((args, kwargs)):
            assert not _on_host(tensor), f"dist.{name} got a tensor that would be on the host"
            assert tensor.device == device, f"dist.{name} got a tensor on {tensor.device}, not {device}"
        seen.append(name)
        return original(*args, **kwargs)
    return collective


def _run_checked(cfg_dict: dict) -> list[str]:
    """Build a trainer, then train and evaluate with every collective checked; the collectives seen."""
    trainer = Trainer(Config.from_dict(cfg_dict), quiet=True)
    device, seen = trainer.parallel.comm_device, []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    original_batch = dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        for op in ops:
            _checked(lambda *a: None, "batch_isend_irecv", device, seen)(op.tensor)
        return original_batch(ops)

    try:
        for name, fn in originals.items():
            setattr(dist, name, _checked(fn, name, device, seen))
        dist.batch_isend_irecv = batch_isend_irecv
        with SimulatedHost():
            result = trainer.fit()
            global_grad_norm(iter(()), world=True, device=device)  # a ZeRO rank that owns no gradient
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.batch_isend_irecv = original_batch
        dist.destroy_process_group()
    assert result.final_eval_loss is not None
    return seen


def _worker(rank: int, ports: tuple[int, int], configs: list[dict], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = []
    for port, cfg_dict in zip(ports, configs):
        os.environ["MASTER_PORT"] = str(port)
        seen.append(_run_checked(cfg_dict))
    results[rank] = seen


def test_collectives_get_tensors_on_the_declared_device(tmp_path):
    configs = []
    for pp in (1, 2):  # DP 2; PP 2
        cfg = tiny_config(tmp_path, save=None, train_iters=2, eval_interval=1, eval_iters=2)
        cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 4
        cfg.parallel.pipeline_parallel_size = pp
        configs.append(cfg.to_dict())
    results = mp.Manager().dict()
    mp.spawn(_worker, args=((free_port(), free_port()), configs, results), nprocs=2, join=True)
    for rank in range(2):
        dp_run, pp_run = results[rank]
        assert "all_reduce" in dp_run
        assert {"all_reduce", "batch_isend_irecv"} <= set(pp_run)
