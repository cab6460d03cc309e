"""The kernel-level GPU cost model of one moetrain step, with the paths a GPU takes (MODELLED, not measured).

    python benchmarks/gpu_cost_model.py [any gpu_roofline.py argument]       # from the repository root
    python benchmarks/gpu_cost_model.py --config mixtral --set model.num_layers=4 --card h100 --accum 1 8

`gpu_roofline.py` (the project's shared tool, ../shared/tools/gpu_roofline.py, or $GPU_ROOFLINE) runs the real
`Trainer.train_step()` on CPU fake tensors and prices every aten op it records on an H100 / H200. It forces the
GPU's expert choices, but moetrain's other CUDA paths are chosen by `moetrain.fused.fused_kernels(device)`,
which is False for the CPU the tool runs on: it would price the CPU's eager decompositions. This wrapper turns
them on (the fused LM-loss chunk, RMSNorm and RoPE ops of moetrain/fused.py, the LM loss's GPU chunk size and
its fp32-accumulating weight-gradient GEMM, whose FLOPs it teaches the tool to count; the experts' weight
gradients accumulated into the fp32 masters by one `addmm(out_dtype=float32)` per expert, with the rows
split evenly over the experts, since fake tensors hold no routing). It also corrects two prices: GEMMs with
`out_dtype` at the 16-bit tensor-core rate (the tool would read the fp32 output as the compute dtype), and
`_foreach_copy_` without reading its destinations (see `priced_as_the_gpu_runs_them`).

How the fused paths are priced: each is one custom op (torch.ops.moetrain.*) whose body is torch.compile'd on
a GPU. The tool records an op below autograd, so it sees one op per fused kernel and prices it as it prices
any memory-bound op: its inputs read once, its outputs written once, one launch (e.g. lm_chunk_grad reads
the 16-bit logits and writes the 16-bit logit gradient: 4 B per logit, where the eager path moved ~40).
A compiled body may launch two kernels (a reduction, then a pointwise pass), each reading the input: the
model counts one, so it is optimistic by up to one extra read of the op's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
def priced_as_the_gpu_runs_them(roofline):
    """Two ops the tool misreads. A GEMM with `out_dtype` (addmm.dtype_out: 16-bit operands, fp32 sums written to
    an fp32 output) runs on the 16-bit tensor cores; the tool takes an op's compute dtype from its first
    floating input, which for addmm is the fp32 output it accumulates into, and would price it at the TF32
    rate. `_foreach_copy_` (the compute copies' refresh) writes its destinations without reading them, as the
    tool already prices `copy_`; it would count them as read too."""
    price = roofline.price

    def corrected(ev):
        if ev.full.endswith((".dtype_out", ".dtype")) and ev.kind == "gemm":
            return dataclasses.replace(ev, dtype="bf16" if "bf16" in ev.inputs else "f16")
        if ev.op == "_foreach_copy_":
            return dataclasses.replace(ev, read=ev.read - ev.written)
        return ev

    with roofline.patched(roofline, "price", lambda events, card, p: price(list(map(corrected, events)), card, p)):
        yield


@contextlib.contextmanager
def gpu_fused_paths(roofline):
    """moetrain's CUDA choices on the CPU the model runs on: every loaded moetrain module that imported
    `fused_kernels` by name answers True (found, not listed, so a path that moves to another module stays
    covered). Import the trainer first so that every module of the step is loaded."""
    import moetrain.fused as fused
    import moetrain.main_grad as main_grad
    import moetrain.moe.experts as experts
    import moetrain.train.trainer  # noqa: F401

    users = [module for name, module in sorted(sys.modules.items())
             if name.startswith("moetrain") and getattr(module, "fused_kernels", None) is fused.fused_kernels]
    with contextlib.ExitStack() as stack:
        for module in users:
            stack.enter_context(roofline.patched(module, "fused_kernels", lambda device: True))
        stack.enter_context(roofline.patched(main_grad, "mixed_dtype_gemm", lambda device: True))
        stack.enter_context(roofline.patched(experts.ExpertBlocks, "host_counts", balanced_counts))
        yield


def balanced_counts(blocks) -> list[int]:
    """Rows per expert for the expert weight-gradient loop, which reads them on the host. Fake tensors hold no
    routing, so the model prices a balanced router: the rows split evenly. On a GPU these counts come from a
    copy started in the forward (`HostCopy`) and are read in the backward: a wait on a long-finished copy, not
    priced as a sync."""
    rows, experts = blocks.expert_of_row.shape[0], blocks.num_experts
    return [rows // experts + (e < rows % experts) for e in range(experts)]


def main(argv: list[str] | None = None) -> int:
    roofline = load_roofline()
    print("cost model with moetrain's GPU paths: moetrain.fused.fused_kernels -> True (fused LM-loss chunk, "
          "RMSNorm, RoPE as one op each; GPU LM-loss chunk size)")
    with gpu_fused_paths(roofline), addmm_with_out_dtype_counted(), priced_as_the_gpu_runs_them(roofline):
        return roofline.main(argv)


if __name__ == "__main__":
    sys.exit(main())
