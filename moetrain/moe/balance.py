"""Load-balancing losses and Sinkhorn routing, Megatron-Core's `--moe-router-load-balancing-type`.

All losses take `probs` [S, E] (the gate probabilities over all experts; sigmoid scores normalised
per token) and the chosen `indices` [S, k], and count every one of the k choices:

- aux_loss (Switch / GShard as Megatron forms it): E / k * sum_e P_e * f_e, P_e the mean probability
  of expert e over the tokens, f_e the fraction of the S tokens' assignments that went to e times k;
- seq_aux_loss (DeepSeek-V2/V3): the same within each sequence, averaged over the sequences;
- global_aux_loss: f_e counted over the data-parallel ranks (an all-reduce of the counts, no host
  sync) and, in training, over the micro-batches of the optimizer step so far (`Router.start_global_batch`);
  P_e local (see `global_loss` for exactly what gets a gradient).

A token `mask` ([S] bool, False for padding) keeps tokens out of both P and f.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

BALANCE_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
SINKHORN_ITERATIONS = 20  # fixed, so no convergence test reads the device


def _weights(num_tokens: int, mask: Tensor | None, like: Tensor) -> Tensor:
    """[S] 1.0 for tokens that count, 0.0 for padding."""
    if mask is None:
        return like.new_ones(num_tokens)
    return mask.to(like.dtype)


def _assignment_counts(indices: Tensor, token_weight: Tensor, num_experts: int, rows: int = 1) -> Tensor:
    """[rows, E] counted assignments (indices viewed as rows of equal length), padding excluded."""
    per_choice = token_weight.unsqueeze(1).expand_as(indices).reshape(rows, -1)
    return per_choice.new_zeros(rows, num_experts).scatter_add_(1, indices.reshape(rows, -1), per_choice)


def switch_loss(probs: Tensor, indices: Tensor, mask: Tensor | None = None) -> Tensor:
    """E / k * sum_e mean_prob_e * (assignments_e / tokens), over the tokens that count."""
    num_tokens, num_experts = probs.shape
    weight = _weights(num_tokens, mask, probs)
    tokens = weight.sum().clamp(min=1)
    mean_prob = (probs * weight.unsqueeze(1)).sum(0) / tokens
    fraction = _assignment_counts(indices, weight, num_experts)[0] / tokens
    return (mean_prob * fraction).sum() * num_experts / indices.shape[1]


def sequence_loss(probs: Tensor, indices: Tensor, batch_shape: tuple[int, int],
                  mask: Tensor | None = None) -> Tensor:
    """DeepSeek-V2's sequence-wise balance loss: `switch_loss` per sequence, averaged over sequences."""
    batch, seq = batch_shape
    num_experts, k = probs.shape[1], indices.shape[1]
    weight = _weights(probs.shape[0], mask, probs)
    tokens = weight.view(batch, seq).sum(1).clamp(min=1)  # [B]
    mean_prob = (probs * weight.unsqueeze(1)).view(batch, seq, num_experts).sum(1) / tokens.unsqueeze(1)
    fraction = _assignment_counts(indices, weight, num_experts, rows=batch) / tokens.unsqueeze(1)
    return (mean_prob * fraction).sum(1).mean() * num_experts / k


class _BalanceAgainst(torch.autograd.Function):
    """sum_e mean_prob_e * fraction_e with `fraction` a constant held on the node itself, not as a saved
    tensor: a recomputed forward (activation checkpointing) replays the router after later micro-batches
    moved the running counts, and its fraction must not replace the one the loss was formed with."""

    @staticmethod
    def forward(ctx, mean_prob: Tensor, fraction: Tensor) -> Tensor:
        ctx.fraction = fraction
        return (mean_prob * fraction).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.fraction, None


def global_loss(probs: Tensor, indices: Tensor, group: dist.ProcessGroup | None,
                mask: Tensor | None = None, running: Tensor | None = None) -> Tensor:
    """`switch_loss` with the assignment fractions of the global batch (Megatron's global_aux_loss).

    For micro-batch i of an optimizer step (`running`: the [E + 1] counts of micro-batches 1..i-1,
    updated in place; None: this micro-batch alone):
        c_j   = assignments per expert and counted tokens of micro-batch j, summed over the ranks of
                `group` (data parallel);
        f_i   = (c_1 + ... + c_i)[:E] / (c_1 + ... + c_i)[E], the fraction of the step's assignments
                so far that went to each expert (Megatron's running mean tokens_per_expert / ga_steps
                over the global tokens of a micro-batch; equal to it when micro-batches are equal);
        loss  = E / k * sum_e P_e * f_i,e, P_e the mean probability of expert e over this rank's
                tokens of micro-batch i.
    f is a constant: the gradient reaches this micro-batch's probabilities only, weighted by the counts
    known when it ran. An earlier micro-batch's probabilities never see a later one's counts (their
    graph has been used by then), so only the last micro-batch is balanced against the whole global
    batch; a run with N micro-batches equals one micro-batch holding the whole batch when the
    micro-batches route alike, and its logged value is the mean of the N losses above.
    Data parallelism: the mean of the ranks' losses (and gradients, as data parallelism averages them)
    is the one-process loss on the ranks' concatenated micro-batches when every rank holds as many
    counted tokens. Megatron-Core divides P by the global token count instead, so its per-rank losses
    sum to that and its averaged gradient is 1/dp of it; here the loss and gradient do not depend on
    the data-parallel size.
    """
    num_tokens, num_experts = probs.shape
    weight = _weights(num_tokens, mask, probs)
    tokens = weight.sum().clamp(min=1)
    mean_prob = (probs * weight.unsqueeze(1)).sum(0) / tokens
    with torch.no_grad():
        counts = torch.cat([_assignment_counts(indices, weight, num_experts)[0], weight.sum().view(1)])
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        if running is not None:  # whole counts, kept exactly in int64 however long the batch
            running += counts.round().long()
            counts = running.double()
        fraction = (counts[:-1] / counts[-1].clamp(min=1)).to(probs.dtype)
    return _BalanceAgainst.apply(mean_prob, fraction) * num_experts / indices.shape[1]


def sinkhorn(logits: Tensor, mask: Tensor | None = None, iterations: int = SINKHORN_ITERATIONS) -> Tensor:
    """Doubly normalised exp(logits) (Sinkhorn-Knopp, Megatron-Core's sinkhorn routing): rows and
    columns scaled alternately so every expert receives the same total mass. Rows of padding
    (mask False) hold no mass. No gradient.

    Computed in log space (float32 at least): the row and column scales are log-sum-exps, so no token's
    exp(logit) underflows however far its logits sit below another token's (one shift by the batch's
    largest logit left such a row all zeros, never normalised, and routed it wrongly). A sharp gate
    (logits spread over hundreds) needs more than the default iterations to reach the exact assignment."""
    with torch.no_grad():
        log_cost = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if mask is not None:
            log_cost = log_cost.masked_fill(~mask.unsqueeze(1), float("-inf"))
        num_tokens, num_experts = log_cost.shape
        # rows share the mass equally among the tokens that count (a tensor: no host sync)
        log_tokens = torch.log(mask.sum().clamp(min=1).to(log_cost.dtype)) if mask is not None \
            else math.log(num_tokens)
        log_row = log_cost.new_zeros(num_tokens, 1)
        log_col = log_cost.new_zeros(1, num_experts)
        for _ in range(iterations):
            log_row = -log_tokens - torch.logsumexp(log_cost + log_col, dim=1, keepdim=True)
            if mask is not None:  # a padding row's sum is 0: its scale stays finite, its mass 0
                log_row = log_row.masked_fill(~mask.unsqueeze(1), 0.0)
            log_col = -math.log(num_experts) - torch.logsumexp(log_cost + log_row, dim=0, keepdim=True)
        return torch.exp(log_cost + log_row + log_col)
