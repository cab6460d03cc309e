"""Precisions a run can train in, and the autocast context of each (used by the trainer and the pipeline)."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for "bf16" / "fp16", and a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])
