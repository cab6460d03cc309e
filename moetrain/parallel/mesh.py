"""The device mesh: which ranks share data, tensors, pipeline stages and experts.

Rank layout, slowest to fastest: pipeline stage, expert-data-parallel, expert-parallel, tensor
parallel. Data parallelism is the flattened (edp, ep) pair, so an explicit expert-parallel size
spreads experts over data-parallel ranks, as DeepSpeed does. Without one, experts follow the
tensor-parallel group (the seed guides' mode): ep = tp and expert gradients reduce over dp.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain.config import ParallelConfig


@dataclass
class ExpertGroups:
    """The groups of one MoE layer whose experts are spread over `size` ranks."""

    size: int  # expert-parallel size of the layer
    rank: int  # this rank's index in its expert-parallel group
    ep_group: dist.ProcessGroup | None  # ranks that split the layer's experts
    reduce_group: dist.ProcessGroup | None  # ranks that hold the same experts (gradients reduce here)
    reduce_size: int
    split_tokens: bool  # experts over tensor-parallel ranks: each rank sends 1/tp of the (replicated) tokens


@dataclass
class ParallelState:
    """Sizes, ranks and process groups of one run; a single process has all sizes 1 and no groups."""

    world_size: int = 1
    rank: int = 0
    pp: int = 1
    dp: int = 1
    tp: int = 1
    ep: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0
    ep_follows_tp: bool = True
    # where every tensor handed to a collective lives: this rank's training device (NCCL has no CPU
    # tensors; gloo takes either). Loss totals, norms and counters are made here, never on the host.
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None
    dp_group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    expert_groups: dict[int, ExpertGroups] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def layer_ep_size(self, num_experts: int) -> int:
        """A layer's expert-parallel size: the run's, or its largest divisor the layer's count allows."""
        return math.gcd(num_experts, self.ep)

    def experts(self, num_experts: int) -> ExpertGroups:
        return self.expert_groups[self.layer_ep_size(num_experts)]


def _new_groups(layout: torch.Tensor, dim: int) -> dist.ProcessGroup:
    """Create one group per line of `layout` along `dim` (collectively); return this rank's."""
    lines = layout.movedim(dim, -1).reshape(-1, layout.shape[dim])
    mine = None
    for line in lines.tolist():
        group = dist.new_group(line)
        if dist.get_rank() in line:
            mine = group
    return mine


def local_device(device_type: str) -> torch.device:
    """This process's device: under torchrun the GPU LOCAL_RANK modulo the GPUs it can see (a job that
    gives each process one GPU through CUDA_VISIBLE_DEVICES sees only GPU 0)."""
    if device_type != "cuda":
        return torch.device(device_type)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def init_parallel(pc: ParallelConfig, device: torch.device | str) -> ParallelState:
    """Join the torchrun job (if any) and build the mesh and every group a model can need.

    `device` (this rank's training device) becomes the communication device of every collective.
    Expert groups are made for every divisor of the expert-parallel size, since a layer whose
    expert count the run's size does not divide runs on gcd(count, ep) ranks (any model: the
    student's, a distillation teacher's).
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        pc.parallel_sizes(1)
        return ParallelState(comm_device=device, expert_groups={1: ExpertGroups(1, 0, None, None, 1, False)})
    if not dist.is_initialized():
        backend = pc.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # a rank that died leaves the others' collectives waiting: fail them after the timeout (torchrun restarts)
        timeout = timedelta(minutes=pc.distributed_timeout_minutes)
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                    timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = pc.parallel_sizes(world)
    pp, dp, tp, ep = sizes["pp"], sizes["dp"], sizes["tp"], sizes["ep"]
    follows_tp = pc.expert_parallel_size is None
    edp_dim = dp if follows_tp else dp // ep
    ep_dim = 1 if follows_tp else ep
    mesh = init_device_mesh(device.type, (pp, edp_dim, ep_dim, tp), mesh_dim_names=("pp", "edp", "ep", "tp"))
    layout = torch.arange(world).view(pp, dp, tp)  # dp index = edp * ep + ep
    state = ParallelState(
        world_size=world, rank=rank, pp=pp, dp=dp, tp=tp, ep=ep,
        pp_rank=mesh.get_local_rank("pp"), dp_rank=mesh.get_local_rank("edp") * ep_dim + mesh.get_local_rank("ep"),
        tp_rank=mesh.get_local_rank("tp"), ep_follows_tp=follows_tp, comm_device=device, mesh=mesh,
        dp_group=mesh["edp", "ep"]._flatten("dp").get_group(), tp_group=mesh.get_group("tp"),
        pp_group=mesh.get_group("pp"))
    for size in (d for d in range(1, ep + 1) if ep % d == 0):
        state.expert_groups[size] = _expert_groups(state, layout, size)
    return state


def leave_job() -> None:
    """End this process's part in a finished distributed run: wait for every rank (none tears its groups down
    under another's last collective), then destroy the process groups. Left to interpreter exit, their
    threads were still running when the C++ objects went away, and a finished job aborted
    (`terminate called without an active exception`, SIGABRT) now and then. The caller drops its own
    references to the groups first (the run's objects); the collection here then frees them while the
    interpreter is whole."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the job's store with keys of this attempt only: a job restarted by --max-restarts
    must not connect to the addresses its dead first attempt left in the agent's store. None: plain env://."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent_hosts_it and os.environ["RANK"] == "0", timeout=timeout,
                          multi_tenant=not agent_hosts_it)
    return dist.PrefixStore(f"moetrain/attempt_{attempt}", store)


def _expert_groups(state: ParallelState, layout: torch.Tensor, size: int) -> ExpertGroups:
    """Groups for layers with `size`-way expert parallelism (created collectively on every rank)."""
    pp, dp, tp = layout.shape
    if size == 1:
        return ExpertGroups(1, 0, None, state.dp_group, dp, False)
    if state.ep_follows_tp:  # experts over the tensor-parallel ranks, replicated over data parallel
        ep_group = _new_groups(layout.view(pp, dp, tp // size, size), 3)
        return ExpertGroups(size, state.tp_rank % size, ep_group, state.dp_group, dp, True)
    # experts over `size` consecutive data-parallel ranks; replicas are `size` apart
    split = layout.view(pp, dp // size, size, tp)
    return ExpertGroups(size, state.dp_rank % size, _new_groups(split, 2), _new_groups(split, 1),
                        dp // size, False)
