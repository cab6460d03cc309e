"""The kernel-level GPU cost model of one moetrain step, with the paths a GPU takes (MODELLED, not measured).

    python benchmarks/gpu_cost_model.py [any gpu_roofline.py argument]       # from the repository root
    python benchmarks/gpu_cost_model.py --config mixtral --set model.num_layers=4 --card h100 --accum 1 8

`gpu_roofline.py` (the project's shared tool, ../shared/tools/gpu_roofline.py, or $GPU_ROOFLINE) runs the real
`Trainer.train_step()` on CPU fake tensors and prices every aten op it records on an H100 / H200. It forces the
GPU's expert choices, but moetrain's other CUDA paths are chosen by `moetrain.fused.fused_kernels(device)`,
which is False for the CPU the tool runs on: it would price the CPU's eager decompositions. This wrapper turns
them on (the fused LM-loss chunk, RMSNorm and RoPE ops of moetrain/fused.py, the LM loss's GPU chunk size and
its fp32-accumulating weight-gradient GEMM, whose FLOPs it teaches the tool to count).

How the fused paths are priced: each is one custom op (torch.ops.moetrain.*) whose body is torch.compile'd on
a GPU. The tool records an op below autograd, so it sees one op per fused kernel and prices it as it prices
any memory-bound op: its inputs read once, its outputs written once, one launch (e.g. lm_chunk_grad reads
the 16-bit logits and writes the 16-bit logit gradient: 4 B per logit, where the eager path moved ~40).
A compiled body may launch two kernels (a reduction, then a pointwise pass), each reading the input: the
model counts one, so it is optimistic by up to one extra read of the op's input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOFLINE = os.environ.get("GPU_ROOFLINE", os.path.join(os.path.dirname(ROOT), "shared", "tools", "gpu_roofline.py"))


def load_roofline():
    """gpu_roofline.py as a module (it imports moetrain from the working directory: run from the root)."""
    if not os.path.isfile(ROOFLINE):
        sys.exit(f"no cost model at {ROOFLINE}; set GPU_ROOFLINE to gpu_roofline.py's path")
    spec = importlib.util.spec_from_file_location("gpu_roofline", ROOFLINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_roofline"] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def addmm_with_out_dtype_counted():
    """torch's FLOP formula for addmm, taught the `out_dtype` overload (`addmm.dtype_out`, the fused LM loss's
    weight-gradient GEMM accumulating bf16 products into fp32): its extra positional argument would otherwise
    land in the formula's out_shape and the GEMM's FLOPs would go uncounted."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = torch.ops.aten.addmm
    formula = flop_registry[packet]
    flop_registry[packet] = lambda self, mat1, mat2, *dtype, **kwargs: formula(self, mat1, mat2, **kwargs)
    try:
        yield
    finally:
        flop_registry[packet] = formula


@contextlib.contextmanager
def gpu_fused_paths(roofline):
    """moetrain's CUDA choices on the CPU the model runs on."""
    import moetrain.lm_loss as lm_loss
    import moetrain.model as model

    with roofline.patched(lm_loss, "fused_kernels", lambda device: True), \
            roofline.patched(model, "fused_kernels", lambda device: True):
        yield


def main(argv: list[str] | None = None) -> int:
    roofline = load_roofline()
    print("cost model with moetrain's GPU paths: moetrain.fused.fused_kernels -> True (fused LM-loss chunk, "
          "RMSNorm, RoPE as one op each; GPU LM-loss chunk size)")
    with gpu_fused_paths(roofline), addmm_with_out_dtype_counted():
        return roofline.main(argv)


if __name__ == "__main__":
    sys.exit(main())
