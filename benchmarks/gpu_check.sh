#!/usr/bin/env bash
# One prepared GPU check of the MoE layer (at most ~8 minutes on an H100/H200):
#   1. torch / CUDA versions, the card, and its measured bf16 matmul rate;
#   2. the GPU tests (pytest -m cuda: bf16 vs fp32, no host sync, CUTLASS grouped GEMM, ZeRO offload,
#      20 steps of --bf16 training with evaluation, recompute and the chunked loss under bf16);
#   3. the bf16 rows of benchmarks/moe_layer.py: 16384 tokens, hidden 4096, FFN 14336, E=8 k=2,
#      and hidden 2048, FFN 1408, E=64 k=6 (fine-grained), TFLOP/s and share of the GEMM rate;
#   4. 50 steps of --bf16 training of a realistic single-GPU model (benchmarks/train_throughput.py's
#      h200 config: llama style, 12 layers, hidden 1024, 16 heads, seq 2048, micro batch 8, 64 experts
#      top-2 every other layer, ~48k-token BPE trained offline on the built-in corpus, which feeds the
#      steps): tokens/s, MFU against section 1's bf16 matmul rate, and peak memory.
# Typical total on an H200: about 5 minutes (the per-step timeouts add up to 12).
# Run from the repository root on a machine with torch installed:
#   PYTHONPATH=. bash benchmarks/gpu_check.sh
# With $OUT set, a summary (and the full log) is written there.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT:-}"
LOG="$(mktemp)"
FAILED="$(mktemp)"  # the block below runs in a pipeline's subshell: failures go through a file
VERSIONS="$(mktemp)"  # section 1's output: section 4 reads the measured matmul rate from it

section() { echo; echo "=== $* ==="; }
fail() { echo "step failed: $*"; echo 1 > "$FAILED"; }

{
section "versions and matmul rate"
timeout 60 "$PYTHON" - <<'EOF' | tee "$VERSIONS" || fail versions
import time, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.0f} GiB")
    from moetrain.moe import grouped_gemm_backend
    print("expert grouped GEMM backend (bf16):", grouped_gemm_backend(torch.device("cuda"), torch.bfloat16))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {2 * 8192**3 * n / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")
EOF

section "pytest -m cuda"
timeout 200 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/moe/test_moe_cuda.py tests/parallel/test_zero_offload.py \
    tests/train/test_gpu.py || fail pytest

section "bf16 MoE rows (forward + backward, autocast over fp32 parameters)"
timeout 130 "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 5 \
    --tokens 16384 --hidden 4096 --ffn 14336 --experts 8 --k 2 \
    --variants dense moetrain moetrain-cf1.25 deepspeed transformers || fail "E=8 row"
timeout 100 "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 5 \
    --tokens 16384 --hidden 2048 --ffn 1408 --experts 64 --k 6 \
    --variants dense moetrain moetrain-cf1.25 deepspeed || fail "E=64 row"

section "50-step --bf16 training, h200 config (5 warm-up + 45 timed steps)"
RATE="$(sed -n 's/^bf16 matmul 8192^3: \([0-9.]*\) TFLOP\/s$/\1/p' "$VERSIONS")"
timeout 240 "$PYTHON" benchmarks/train_throughput.py --configs h200 --device cuda --bf16 --data corpus \
    --no-peer --warmup 5 --steps 45 ${RATE:+--matmul-tflops "$RATE"} || fail "h200 training"
} 2>&1 | tee "$LOG"
status=0
[ -s "$FAILED" ] && status=1
echo "gpu_check status: $status (0: every step ran)" | tee -a "$LOG"

if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    cp "$LOG" "$OUT_DIR/gpu_check.log"
    grep -E "^(torch |device |expert grouped|bf16 matmul|\| |\[h200\]|[0-9]+ (passed|failed|skipped)|.*(passed|failed|error)|gpu_check status)" \
        "$LOG" > "$OUT_DIR/gpu_check_summary.txt"
fi
rm -f "$LOG" "$FAILED" "$VERSIONS"
exit $status
