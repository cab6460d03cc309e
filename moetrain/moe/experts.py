"""Experts: run every expert on its contiguous block of rows and apply the routing weights.

`GroupedExperts` stores all experts as stacked weights ([E, d, f], [E, f, d]) and runs them as
grouped matrix multiplies (`torch._grouped_mm` where the device and dtype allow, a loop of
matmuls elsewhere); on a multi-threaded CPU, ranges of experts side by side on single-threaded
workers. Its autograd function applies the routing weight to the [N, d] output,
(w * act(x W1)) W2 = w * (act(x W1) W2), and keeps the input, the pre-activation and the
unweighted output for backward but not the activation (recomputed), so the layer holds less
activation memory than a dense FFN on the same rows.

`ModuleExperts` deep-copies any `nn.Module` expert, as DeepSpeed does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.fused import fused_kernels, route_weight_backward, swiglu, swiglu_backward
from moetrain.main_grad import Linear, accumulated, addmm_into, gradient_buffer, master_of
from moetrain.moe.expert_threads import run_experts_threaded, use_expert_threads

ACTIVATIONS = ("gelu", "relu", "swiglu")


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        if fused_kernels(h.device):  # one fused op (moetrain.fused), differentiable
            return swiglu(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h)


@dataclass
class ExpertBlocks:
    """Where each expert's contiguous block of rows lies, without asking the host.

    Rows of expert e are [ends[e-1], ends[e]); rows past ends[-1] belong to no expert (assignments
    dropped by the capacity limit, kept in place so every shape is static) and come out as zeros.
    `counts` holds the same on the host when it is known for free (a CPU tensor, or the split
    sizes expert parallelism copies to the host anyway); `host_counts()` copies it otherwise.
    """

    ends: Tensor  # [E] int32, on the rows' device: the offsets torch._grouped_mm takes
    expert_of_row: Tensor  # [N] int64; E for rows of no expert
    counts: list[int] | None = None
    all_rows_used: bool = False  # known without looking: no row past ends[-1]

    @classmethod
    def from_counts(cls, counts: list[int], device: torch.device | str = "cpu") -> ExpertBlocks:
        """Blocks of counts[e] rows each, one after the other, every row used."""
        sizes = torch.tensor(counts, dtype=torch.long, device=device)
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes,
                                                output_size=sum(counts))
        return cls(sizes.cumsum(0).to(torch.int32), expert_of_row, list(counts), True)

    @property
    def num_experts(self) -> int:
        return self.ends.shape[0]

    def host_counts(self) -> list[int]:
        """Rows per expert as Python ints (one device-to-host copy unless known already)."""
        if self.counts is None:
            self.counts = torch.diff(self.ends, prepend=self.ends.new_zeros(1)).tolist()
        return self.counts

    def used_rows(self) -> Tensor:
        """[N, 1] bool: the row belongs to an expert."""
        return (self.expert_of_row < self.num_experts).unsqueeze(1)


EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])
# torch._grouped_mm's CUTLASS kernel: bf16 on compute capability 9.x from torch 2.8, 10.x from 2.9.
# Elsewhere on CUDA it loops inside aten after copying the offsets to the host (or raises, on 2.8).
_CUTLASS_GROUPED_MM_SINCE = {9: (2, 8), 10: (2, 9)}


def grouped_gemm_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'grouped_mm' (one torch._grouped_mm call per product, offsets stay on the device) where it
    has a fast kernel: bf16 on CUDA compute capability 9.x/10.x, float32 on the CPU. 'loop' (one
    matmul per expert, counts on the host) elsewhere."""
    if dtype not in EXPERT_DTYPES:
        raise ValueError(f"experts cannot compute in {dtype}; use float32, bfloat16, float16 or "
                         "float64 parameters, or bf16/fp16 autocast")
    if not hasattr(torch, "_grouped_mm"):
        return "loop"
    if device.type == "cpu":
        return "grouped_mm" if dtype == torch.float32 else "loop"
    if device.type == "cuda" and dtype == torch.bfloat16:
        since = _CUTLASS_GROUPED_MM_SINCE.get(torch.cuda.get_device_capability(device)[0])
        if since is not None and _TORCH_VERSION >= since:
            return "grouped_mm"
    return "loop"


def _aligned(inner: int, outer: int, dtype: torch.dtype) -> bool:
    """torch._grouped_mm needs 16-byte aligned strides. Judged from the widths alone (the operands
    are contiguous tensors or their transposes; a compiled graph has no data pointers)."""
    size = dtype.itemsize
    return inner * size % 16 == 0 and outer * size % 16 == 0


@torch.library.custom_op("moetrain::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm behind an op that torch.compile does not look into: its shape function
    accepts bf16 only, so a compiled float32 graph (CPU) calls this instead."""
    return torch._grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:  # [N, a] x [E, a, b] -> [N, b]
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # [a, N] x [N, b] -> [E, a, b]


def _torch_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return _opaque_grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def _as_blocks(blocks: ExpertBlocks | list[int], device: torch.device) -> ExpertBlocks:
    return blocks if isinstance(blocks, ExpertBlocks) else ExpertBlocks.from_counts(blocks, device)


def grouped_mm(rows: Tensor, weights: Tensor, blocks: ExpertBlocks | list[int],
               out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """rows [N, a] (grouped by expert) @ weights[e] [a, b] -> [N, b]; rows of no expert are
    left undefined (the caller masks them).

    With `out` the products are written into it (the threaded CPU path fills row slices of one
    buffer); without it, torch._grouped_mm runs where `grouped_gemm_backend` allows.
    """
    blocks = _as_blocks(blocks, rows.device)
    backend = backend or grouped_gemm_backend(rows.device, rows.dtype)
    if out is None and backend == "grouped_mm" and _aligned(rows.shape[1], weights.shape[2], rows.dtype):
        return _torch_grouped_mm(rows, weights, blocks.ends)
    counts = blocks.host_counts()
    used = sum(counts)
    if out is None:
        out = rows.new_empty(rows.shape[0], weights.shape[-1])
    for block_in, block_out, weight in zip(rows[:used].split(counts), out[:used].split(counts), weights):
        torch.mm(block_in, weight, out=block_out)
    return out


def grouped_weight_grad(rows: Tensor, grad: Tensor, blocks: ExpertBlocks | list[int],
                        out: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Per-expert rows_e^T @ grad_e -> [E, a, b]: the weight gradient of `grouped_mm` (rows of no
    expert do not count)."""
    blocks = _as_blocks(blocks, rows.device)
    backend = backend or grouped_gemm_backend(rows.device, rows.dtype)
    if out is None and backend == "grouped_mm" and _aligned(rows.shape[1], grad.shape[1], rows.dtype):
        return _torch_grouped_mm(rows.t(), grad, blocks.ends)
    counts = blocks.host_counts()
    used = sum(counts)
    if out is None:
        out = rows.new_empty(len(counts), rows.shape[1], grad.shape[1])
    for expert_out, block_in, block_grad in zip(out, rows[:used].split(counts), grad[:used].split(counts)):
        if block_in.shape[0]:
            torch.mm(block_in.t(), block_grad, out=expert_out)
        else:
            expert_out.zero_()
    return out


def accumulate_weight_grad(master: nn.Parameter, rows: Tensor, grad: Tensor, counts: list[int]) -> None:
    """master.grad[e] (+)= rows_e^T @ grad_e for every expert, by one GEMM per expert writing the fp32 gradient
    itself (moetrain.main_grad: torch._grouped_mm cannot accumulate into an fp32 output)."""
    main, beta = gradient_buffer(master)
    used = sum(counts)
    for expert_grad, block_in, block_grad in zip(main, rows[:used].split(counts), grad[:used].split(counts)):
        if block_in.shape[0]:
            addmm_into(expert_grad, block_in.t(), block_grad, beta)
        elif beta == 0:
            expert_grad.zero_()
    accumulated(master)


class HostCopy:
    """A small device tensor copied to pinned host memory without waiting; `read()` waits for the copy.
    Started in a forward and read in the backward, by when it has long finished (the later layers' forward
    and the loss ran in between): the expert counts a per-expert GEMM loop needs, without a host stall."""

    def __init__(self, tensor: Tensor) -> None:
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def read(self) -> Tensor:
        self.done.synchronize()
        return self.host


def _per_expert_sum(rows: Tensor, blocks: ExpertBlocks) -> Tensor:
    """Sum of each expert's rows -> [E, b] (bias gradients); rows of no expert go to a spare
    bucket that is dropped."""
    sums = rows.new_zeros(blocks.num_experts + 1, rows.shape[1])
    return sums.index_add_(0, blocks.expert_of_row, rows)[:-1]


def _per_row(bias: Tensor, blocks: ExpertBlocks) -> Tensor:
    """Each row's expert bias (rows of no expert take the last one; they are masked later)."""
    return bias.index_select(0, blocks.expert_of_row.clamp(max=blocks.num_experts - 1))


def _activation_and_grad(h: Tensor, grad_act: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """act(h), recomputed in backward, and d loss / d h from d loss / d act in the same pass: aten's
    backward kernels, no autograd graph; SwiGLU is one fused op on CUDA (moetrain.fused)."""
    if activation == "relu":
        return F.relu(h), torch.ops.aten.threshold_backward(grad_act, h, 0)
    if activation == "gelu":
        return F.gelu(h), torch.ops.aten.gelu_backward(grad_act, h)
    if fused_kernels(h.device):
        return swiglu_backward(h, grad_act)
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    if torch.compiler.is_compiling():  # no out= into views there; the compiler fuses anyway
        grad_h = torch.cat([torch.ops.aten.silu_backward(grad_act * up, gate), grad_act * silu_gate], -1)
    else:  # eager: write both halves in place, no concatenation copy
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_act, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_gate)
    return silu_gate * up, grad_h


# ---------------------------------------------------------------------------------------------
# Expert math on a range of experts. `_GroupedMLP` runs it once over all experts (one grouped
# GEMM per matrix: GPUs, single-threaded CPUs) or, on a multi-threaded CPU, range by range on
# single-threaded workers (moetrain.moe.expert_threads), each writing its rows' slices of
# shared output buffers.
# ---------------------------------------------------------------------------------------------
def _experts_forward(x, w1, b1, w2, b2, route_weight, blocks, activation, backend,
                     h=None, o=None, y=None):
    """y = w * o, o = act(x W1 + b1) W2 + b2 (y = o without routing weights). Returns (h, o, y);
    h (the pre-activation) and o are what backward keeps."""
    h = grouped_mm(x, w1, blocks, out=h, backend=backend)
    if b1 is not None:
        h += _per_row(b1, blocks)
    o = grouped_mm(_activate(h, activation), w2, blocks, out=o, backend=backend)
    if b2 is not None:
        o += _per_row(b2, blocks)
    if route_weight is None:
        return h, o, o
    y = torch.mul(o, route_weight.to(o.dtype).unsqueeze(1), out=y)
    return h, o, y


def _experts_backward(grad_y, x, w1, b1, w2, b2, route_weight, h, o, blocks, activation, backend,
                      out=None, masters=None):
    """Gradients (x, w1, b1, w2, b2, route_weight) of `_experts_forward`, written into `out` if given. With
    `masters` (w1's and w2's fp32 masters) the weight gradients go into the masters' .grad instead (None)."""
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_route = out or (None,) * 6
    master_w1, master_w2 = masters or (None, None)
    grad_o = grad_y
    if route_weight is not None:
        if fused_kernels(grad_y.device):  # one op reading grad_y once (moetrain.fused)
            grad_o, route = route_weight_backward(grad_y, o, route_weight)
        else:
            route = torch.linalg.vecdot(grad_y, o).to(route_weight.dtype)
            grad_o = grad_y * route_weight.to(grad_y.dtype).unsqueeze(1)
        grad_route = _copy_or_return(route, grad_route)
    # d loss / d act through w2 first, so one pass over h recomputes act and gives d loss / d h
    grad_act = grouped_mm(grad_o, w2.transpose(1, 2), blocks, backend=backend)
    act, grad_h = _activation_and_grad(h, grad_act, activation)
    grad_w2 = _weight_grad(act, grad_o, blocks, grad_w2, backend, master_w2)
    if b2 is not None:
        grad_b2 = _copy_or_return(_per_expert_sum(grad_o, blocks), grad_b2)
    grad_w1 = _weight_grad(x, grad_h, blocks, grad_w1, backend, master_w1)
    if b1 is not None:
        grad_b1 = _copy_or_return(_per_expert_sum(grad_h, blocks), grad_b1)
    grad_x = grouped_mm(grad_h, w1.transpose(1, 2), blocks, out=grad_x, backend=backend)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_route


def _weight_grad(rows: Tensor, grad: Tensor, blocks: ExpertBlocks, out: Tensor | None, backend: str,
                 master: nn.Parameter | None) -> Tensor | None:
    if master is None:
        return grouped_weight_grad(rows, grad, blocks, out=out, backend=backend)
    accumulate_weight_grad(master, rows, grad, blocks.host_counts())
    return None


def _copy_or_return(value: Tensor, out: Tensor | None) -> Tensor:
    return value if out is None else out.copy_(value)


def _zero_unused_rows(t: Tensor | None, blocks: ExpertBlocks) -> Tensor | None:
    """Rows of no expert hold whatever the GEMMs left there: make them 0."""
    if t is None or blocks.all_rows_used:
        return t
    used = blocks.used_rows()
    return torch.where(used if t.dim() == 2 else used.squeeze(1), t, 0)


class _GroupedMLP(torch.autograd.Function):
    """y = w * (act(x W1 + b1) W2 + b2) per expert block (w = 1 when route_weight is None).

    Backward recomputes act from the saved pre-activation and keeps the unweighted [N, d] output
    o for the routing weight's gradient (grad_y . o): x, h and o are kept, not the activation.
    `backend` is a `grouped_gemm_backend` answer or 'threads' (CPU worker threads). With `masters` (the fp32
    masters of 16-bit w1 and w2 compute copies) the weight gradients accumulate into the masters' gradients
    (`accumulate_weight_grad`); the counts that needs are copied to the host during the forward.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, route_weight, ends, expert_of_row, counts, all_rows_used,
                activation, backend, masters):
        blocks = ExpertBlocks(ends, expert_of_row, counts, all_rows_used)
        ctx.masters = masters
        ctx.host_ends = HostCopy(ends) if masters is not None and counts is None and ends.is_cuda else None
        args = (x, w1, b1, w2, b2, route_weight)
        if backend == "threads":
            counts = blocks.host_counts()
            h = x.new_empty(x.shape[0], w1.shape[2])
            o = x.new_empty(x.shape[0], w2.shape[2])
            y = o if route_weight is None else torch.empty_like(o)
            run_experts_threaded(counts, lambda experts, rows: _experts_forward(
                *_expert_slice(args, experts, rows), _slice_blocks(counts, experts, x.device),
                activation, "loop", h[rows], o[rows], y[rows]))
        else:
            h, o, y = _experts_forward(*args, blocks, activation, backend)
        ctx.save_for_backward(*args, h, None if route_weight is None else o, ends, expert_of_row)
        ctx.counts, ctx.all_rows_used = blocks.counts, all_rows_used
        ctx.activation, ctx.backend = activation, backend
        return _zero_unused_rows(y, blocks)

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, b1, w2, b2, route_weight, h, o, ends, expert_of_row = ctx.saved_tensors
        blocks = ExpertBlocks(ends, expert_of_row, ctx.counts, ctx.all_rows_used)
        params = (x, w1, b1, w2, b2, route_weight)
        activation = ctx.activation
        grad_y = grad_y.contiguous()
        if ctx.host_ends is not None:
            blocks.counts = torch.diff(ctx.host_ends.read(), prepend=ends.new_zeros(1, device="cpu")).tolist()
        if ctx.backend == "threads":
            counts = blocks.host_counts()
            grads = tuple(None if t is None else torch.empty_like(t) for t in params)
            run_experts_threaded(counts, lambda experts, rows: _experts_backward(
                grad_y[rows], *_expert_slice(params, experts, rows), h[rows],
                None if o is None else o[rows], _slice_blocks(counts, experts, x.device),
                activation, "loop", _expert_slice(grads, experts, rows)))
        else:
            grads = _experts_backward(grad_y, *params, h, o, blocks, activation, ctx.backend, masters=ctx.masters)
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_route = grads
        return (_zero_unused_rows(grad_x, blocks), grad_w1, grad_b1, grad_w2, grad_b2,
                _zero_unused_rows(grad_route, blocks), None, None, None, None, None, None, None)


def _expert_slice(tensors, experts: slice, rows: slice) -> tuple:
    """(x, w1, b1, w2, b2, route_weight)-shaped tuple cut to a range of experts and their rows."""
    x, w1, b1, w2, b2, route = tensors
    return (x[rows], w1[experts], None if b1 is None else b1[experts], w2[experts],
            None if b2 is None else b2[experts], None if route is None else route[rows])


def _slice_blocks(counts: list[int], experts: slice, device: torch.device) -> ExpertBlocks:
    return ExpertBlocks.from_counts(counts[experts], device)


def expert_compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype where autocast is on for the device, else the parameters' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _accumulating_masters(w1: Tensor, w2: Tensor, backend: str) -> tuple[nn.Parameter, nn.Parameter] | None:
    """The fp32 masters w1's and w2's weight gradients are written into directly (moetrain.main_grad), or None."""
    masters = (master_of(w1), master_of(w2))
    return None if None in masters or backend == "threads" else masters


class GroupedExperts(nn.Module):
    """E experts of one MLP shape as stacked weights: the fast path."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu", bias: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        self.activation = activation
        first_width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden_size, first_width) * init_std)
        self.w2 = nn.Parameter(torch.randn(num_experts, ffn_hidden_size, hidden_size) * init_std)
        self.b1 = nn.Parameter(torch.zeros(num_experts, first_width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def keep(self, first: int, stop: int) -> None:
        """Keep experts [first, stop) only: this rank's share under expert parallelism."""
        for name in ("w1", "w2", "b1", "b2"):
            weight = getattr(self, name)
            if weight is not None:
                setattr(self, name, nn.Parameter(weight.detach()[first:stop].clone()))

    def forward(self, rows: Tensor, blocks: ExpertBlocks | list[int],
                route_weight: Tensor | None = None) -> Tensor:
        """Expert outputs for rows grouped by expert (`blocks`, or rows per expert), times
        `route_weight` when given; in the autocast dtype under autocast (inputs and weights cast
        once here, gradients flow back to the parameters in their own dtype)."""
        blocks = _as_blocks(blocks, rows.device)
        dtype = expert_compute_dtype(rows.device, self.w1.dtype)
        if use_expert_threads(rows, blocks.num_experts):
            backend = "threads"
        else:
            backend = grouped_gemm_backend(rows.device, dtype)
        w1, b1, w2, b2 = (None if p is None else p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        # rows needing no gradient: no backward of ours would run, autograd carries the weights' gradients
        masters = _accumulating_masters(w1, w2, backend) if rows.requires_grad else None
        if masters is not None:  # out of the graph: AccumulateGrad would run the masters' hooks again
            w1, w2 = w1.detach(), w2.detach()
        return _GroupedMLP.apply(rows.to(dtype).contiguous(), w1, b1, w2, b2, route_weight, blocks.ends,
                                 blocks.expert_of_row, blocks.counts, blocks.all_rows_used,
                                 self.activation, backend, masters)


class ModuleExperts(nn.Module):
    """Deep copies of a user's expert module, each run on its block of rows."""

    def __init__(self, expert: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def keep(self, first: int, stop: int) -> None:
        """Keep experts [first, stop) only: this rank's share under expert parallelism."""
        self.experts = nn.ModuleList(self.experts[first:stop])

    def forward(self, rows: Tensor, blocks: ExpertBlocks | list[int],
                route_weight: Tensor | None = None) -> Tensor:
        """Needs the rows per expert on the host (one device-to-host copy when not known)."""
        counts = _as_blocks(blocks, rows.device).host_counts()
        used = sum(counts)
        outputs = []
        for expert, block in zip(self.experts, rows[:used].split(counts)):
            if block.shape[0] == 0:
                continue
            out = expert(block)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        if used < rows.shape[0] or not outputs:  # rows of no expert: zeros
            outputs.append(rows.new_zeros(rows.shape[0] - used, rows.shape[1]))
        out = torch.cat(outputs)
        return out if route_weight is None else out * route_weight.to(out.dtype).unsqueeze(1)


class MLP(nn.Module):
    """Dense feed-forward block with the experts' layout: fc1 [d -> f (2f for swiglu)], fc2.

    Used for dense layers, shared experts and the residual branch of PR-MoE, so a dense FFN
    copies into a grouped expert one to one (upcycling, checkpoint conversion).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu",
                 bias: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        self.activation = activation
        first_width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.fc1 = Linear(hidden_size, first_width, bias=bias)
        self.fc2 = Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activate(self.fc1(x), self.activation))
