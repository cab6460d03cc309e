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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe.expert_threads import run_experts_threaded, use_expert_threads

ACTIVATIONS = ("gelu", "relu", "swiglu")


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h)


def _use_torch_grouped_mm(*operands: Tensor) -> bool:
    """torch._grouped_mm takes fp32/bf16/fp16 with 16-byte aligned rows; other shapes loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in operands:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if t.data_ptr() % 16 or any(stride * t.element_size() % 16 for stride in t.stride() if stride != 1):
            return False
    return True


def grouped_mm(rows: Tensor, weights: Tensor, counts: list[int], out: Tensor | None = None) -> Tensor:
    """rows [N, a] (grouped by expert, counts[e] rows each) @ weights[e] [a, b] -> [N, b].

    With `out` the products are written into it (the threaded CPU path fills row slices of one
    buffer); without it, torch._grouped_mm runs where it can.
    """
    if out is None and _use_torch_grouped_mm(rows, weights):
        offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(rows, weights, offs=offsets)
    if out is None:
        out = rows.new_empty(rows.shape[0], weights.shape[-1])
    for block_in, block_out, weight in zip(rows.split(counts), out.split(counts), weights):
        torch.mm(block_in, weight, out=block_out)
    return out


def grouped_weight_grad(rows: Tensor, grad: Tensor, counts: list[int],
                        out: Tensor | None = None) -> Tensor:
    """Per-expert rows_e^T @ grad_e -> [E, a, b]: the weight gradient of `grouped_mm`."""
    if out is None and _use_torch_grouped_mm(rows, grad):
        offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(rows.t(), grad, offs=offsets)
    if out is None:
        out = rows.new_empty(len(counts), rows.shape[1], grad.shape[1])
    for expert_out, block_in, block_grad in zip(out, rows.split(counts), grad.split(counts)):
        if block_in.shape[0]:
            torch.mm(block_in.t(), block_grad, out=expert_out)
        else:
            expert_out.zero_()
    return out


def _per_expert_sum(rows: Tensor, counts: list[int]) -> Tensor:
    """Sum of each expert's block of rows -> [E, b] (bias gradients)."""
    expert_of_row = torch.repeat_interleave(
        torch.arange(len(counts), device=rows.device), torch.tensor(counts, device=rows.device))
    return rows.new_zeros(len(counts), rows.shape[1]).index_add_(0, expert_of_row, rows)


def _per_row(bias: Tensor, counts: list[int]) -> Tensor:
    return torch.repeat_interleave(bias, torch.tensor(counts, device=bias.device), dim=0)


def _activation_with_grad(h: Tensor, activation: str):
    """act(h), recomputed in backward, and a function taking d loss / d act to d loss / d h that
    reuses what the recomputation made (fused aten backward kernels, no autograd graph)."""
    if activation == "relu":
        return F.relu(h), lambda grad_act: torch.ops.aten.threshold_backward(grad_act, h, 0)
    if activation == "gelu":
        return F.gelu(h), lambda grad_act: torch.ops.aten.gelu_backward(grad_act, h)
    gate, up = h.chunk(2, dim=-1)
    silu_gate = F.silu(gate)

    def swiglu_grad(grad_act: Tensor) -> Tensor:
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_act, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_gate)
        return grad_h

    return silu_gate * up, swiglu_grad


# ---------------------------------------------------------------------------------------------
# Expert math on a range of experts. `_GroupedMLP` runs it once over all experts (one grouped
# GEMM per matrix: GPUs, single-threaded CPUs) or, on a multi-threaded CPU, range by range on
# single-threaded workers (moetrain.moe.expert_threads), each writing its rows' slices of
# shared output buffers.
# ---------------------------------------------------------------------------------------------
def _experts_forward(x, w1, b1, w2, b2, route_weight, counts, activation, h=None, o=None, y=None):
    """y = w * o, o = act(x W1 + b1) W2 + b2. Returns (h, o, y); h (the pre-activation) and o
    are what backward keeps."""
    h = grouped_mm(x, w1, counts, out=h)
    if b1 is not None:
        h += _per_row(b1, counts)
    o = grouped_mm(_activate(h, activation), w2, counts, out=o)
    if b2 is not None:
        o += _per_row(b2, counts)
    y = torch.mul(o, route_weight.to(o.dtype).unsqueeze(1), out=y)
    return h, o, y


def _experts_backward(grad_y, x, w1, b1, w2, b2, route_weight, h, o, counts, activation, out=None):
    """Gradients (x, w1, b1, w2, b2, route_weight) of `_experts_forward`, written into `out` if given."""
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_route = out or (None,) * 6
    grad_route = _copy_or_return(torch.linalg.vecdot(grad_y, o).to(route_weight.dtype), grad_route)
    grad_o = grad_y * route_weight.to(grad_y.dtype).unsqueeze(1)
    act, act_grad = _activation_with_grad(h, activation)
    grad_w2 = grouped_weight_grad(act, grad_o, counts, out=grad_w2)
    if b2 is not None:
        grad_b2 = _copy_or_return(_per_expert_sum(grad_o, counts), grad_b2)
    grad_h = act_grad(grouped_mm(grad_o, w2.transpose(1, 2), counts))
    grad_w1 = grouped_weight_grad(x, grad_h, counts, out=grad_w1)
    if b1 is not None:
        grad_b1 = _copy_or_return(_per_expert_sum(grad_h, counts), grad_b1)
    grad_x = grouped_mm(grad_h, w1.transpose(1, 2), counts, out=grad_x)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_route


def _copy_or_return(value: Tensor, out: Tensor | None) -> Tensor:
    return value if out is None else out.copy_(value)


class _GroupedMLP(torch.autograd.Function):
    """y = w * (act(x W1 + b1) W2 + b2) per expert block.

    Backward recomputes act from the saved pre-activation and keeps the unweighted [N, d] output
    o for the routing weight's gradient (grad_y . o): x, h and o are kept, not the activation.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, route_weight, counts, activation):
        args = (x, w1, b1, w2, b2, route_weight)
        if use_expert_threads(x, counts):
            h = x.new_empty(x.shape[0], w1.shape[2])
            o, y = x.new_empty(x.shape), x.new_empty(x.shape)
            run_experts_threaded(counts, lambda experts, rows: _experts_forward(
                *_expert_slice(args, experts, rows), counts[experts], activation, h[rows], o[rows],
                y[rows]))
        else:
            h, o, y = _experts_forward(*args, counts, activation)
        ctx.save_for_backward(*args, h, o)
        ctx.counts, ctx.activation = counts, activation
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, b1, w2, b2, route_weight, h, o = ctx.saved_tensors
        params = (x, w1, b1, w2, b2, route_weight)
        counts, activation = ctx.counts, ctx.activation
        grad_y = grad_y.contiguous()
        if use_expert_threads(x, counts):
            grads = tuple(None if t is None else torch.empty_like(t) for t in params)
            run_experts_threaded(counts, lambda experts, rows: _experts_backward(
                grad_y[rows], *_expert_slice(params, experts, rows), h[rows], o[rows],
                counts[experts], activation, _expert_slice(grads, experts, rows)))
        else:
            grads = _experts_backward(grad_y, *params, h, o, counts, activation)
        return (*grads, None, None)


def _expert_slice(tensors, experts: slice, rows: slice) -> tuple:
    """(x, w1, b1, w2, b2, route_weight)-shaped tuple cut to a range of experts and their rows."""
    x, w1, b1, w2, b2, route = tensors
    return (x[rows], w1[experts], None if b1 is None else b1[experts], w2[experts],
            None if b2 is None else b2[experts], route[rows])


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

    def forward(self, rows: Tensor, tokens_per_expert: list[int], route_weight: Tensor) -> Tensor:
        return _GroupedMLP.apply(rows, self.w1, self.b1, self.w2, self.b2, route_weight,
                                 tokens_per_expert, self.activation)


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

    def forward(self, rows: Tensor, tokens_per_expert: list[int], route_weight: Tensor) -> Tensor:
        outputs = []
        for expert, block in zip(self.experts, rows.split(tokens_per_expert)):
            if block.shape[0] == 0:
                continue
            out = expert(block)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        if not outputs:
            return rows.new_zeros(rows.shape)
        return torch.cat(outputs) * route_weight.to(rows.dtype).unsqueeze(1)


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
        self.fc1 = nn.Linear(hidden_size, first_width, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activate(self.fc1(x), self.activation))
