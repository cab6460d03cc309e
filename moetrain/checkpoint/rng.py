"""RNG states of python, numpy and torch as weights_only-safe values, saved with every checkpoint."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy, torch CPU and CUDA, as weights_only-safe values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, gauss_next): already safe
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored for the devices present."""
    missing = {"python", "numpy", "torch_cpu"} - state.keys()
    if missing:
        raise KeyError(f"RNG state lacks {sorted(missing)}; pass a dict made by capture_rng_state()")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda_states)} devices but "
                          f"{torch.cuda.device_count()} are visible; restoring the overlapping ones")
        for device_index, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device_index)


def rank_rng_state(extra: dict, rank: int, world_size: int) -> dict:
    """This rank's saved RNG state; under a different world size, rank modulo the saved count."""
    if "rng_per_rank" in extra:
        states = extra["rng_per_rank"]
        return states[rank % len(states)]
    return extra["rng"]
