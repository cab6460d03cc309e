#!/usr/bin/env bash
# The first lent GPU's check, prepared to get everything out of one run (step time-outs sum to 540 s):
#   1. smoke (30 s): versions, the card, one bf16 MoE forward/backward and one --bf16 training step (every
#      CUDA path: compute copies, weight gradients written into the fp32 masters, the fused ops);
#   2. pytest -rA --tb=short -m cuda (bf16 vs fp32, no host sync, CUTLASS grouped GEMM, ZeRO offload,
#      bf16 training with evaluation, the compiled fused ops against the CPU reference, the masters'
#      gradients with and without the gradient-accumulation fusion) (120 s);
#   3. the measured bf16 matmul rate (20 s);
#   4. the bf16 rows of benchmarks/moe_layer.py (E=8 k=2 Mixtral-sized, E=64 k=6 fine-grained); a peer
#      (DeepSpeed, transformers) that fails reports n/a, the row stands (150 s);
#   5. --bf16 training of the h200 config (benchmarks/train_throughput.py: llama style, 12 layers,
#      hidden 1024, seq 2048, micro-batch 8, 64 experts top-2 every other layer, ~48k BPE; the fused ops
#      compile in its first steps) (180 s);
#   6. the cost model's step for the same config and card (benchmarks/gpu_cost_model.py, when
#      gpu_roofline.py is there, else the modelled rows recorded in BENCHMARKS.md), printed beside the
#      measured step with the model's error (40 s).
# Run from anywhere on the GPU machine:  bash benchmarks/gpu_check.sh
# With $OUT set, the log streams to $OUT/gpu_check.log as it runs (a killed call still returns it) and a
# summary lands in $OUT/gpu_check_summary.txt.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PYTHON="${PYTHON:-python3}"  # the GPU image's interpreter (/opt/torch/.venv/bin/python3) holds torch
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1  # streamed: whatever ran is in $OUT even if the call is killed
STATUS=0

section() { echo; echo "=== $* ($(date -u +%H:%M:%S)) ==="; }
step() {  # step SECONDS NAME COMMAND...: run under a time-out, record a failure, go on
    local seconds=$1 name=$2
    shift 2
    timeout --kill-after=5 "$seconds" "$@"
    local code=$?
    if [ $code -ne 0 ]; then
        echo "step failed: $name (exit $code$([ $code -eq 124 ] && echo ", timed out after ${seconds}s"))"
        STATUS=1
    fi
}

section "1. smoke: versions, one bf16 MoE forward/backward, one --bf16 training step"
MOETRAIN_EAGER_FUSED=1 step 30 smoke "$PYTHON" - <<'EOF'
import tempfile, time, torch
start = time.perf_counter()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
props = torch.cuda.get_device_properties(0)
print(f"device {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
from moetrain.config import Config
from moetrain.moe import MoE, grouped_gemm_backend
from moetrain.train.trainer import Trainer
print("expert grouped GEMM backend (bf16):", grouped_gemm_backend(torch.device("cuda"), torch.bfloat16))
layer = MoE(256, num_experts=8, k=2, ffn_hidden_size=512, activation="swiglu", drop_tokens=False).cuda()
x = torch.randn(4096, 256, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = layer(x)[0]
out.float().square().mean().backward()
torch.cuda.synchronize()
print(f"bf16 MoE forward/backward: finite {bool(torch.isfinite(x.grad).all())}")
root = tempfile.mkdtemp()
with open(f"{root}/doc.txt", "w") as f:
    f.write("the quick brown fox jumps over the lazy dog. " * 200)
cfg = Config()
cfg.model.style, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = "llama", 2, 64, 4
cfg.model.seq_length, cfg.moe.num_experts, cfg.moe.topk = 32, [4], 2
cfg.data.data_path, cfg.data.tokenizer_type, cfg.data.split = [root], "byte", "100,0,0"
t = cfg.training
t.device, t.precision, t.micro_batch_size, t.train_iters, t.progress_bar, t.save = "cuda", "bf16", 4, 1, False, None
step = Trainer(cfg, quiet=True).train_step()
print(f"one --bf16 training step: loss {step['losses']['loss']:.3f}, grad norm {step['grad_norm']:.3f}, "
      f"skipped {step['skipped']}; smoke took {time.perf_counter() - start:.1f} s")
EOF

section "2. pytest -m cuda"
step 120 pytest "$PYTHON" -m pytest -rA --tb=short -q -m cuda -p no:cacheprovider \
    tests/moe/test_moe_cuda.py tests/parallel/test_zero_offload.py tests/train/test_gpu.py tests/model/test_fused.py

section "3. bf16 matmul rate"
step 20 matmul "$PYTHON" - <<'EOF'
import time, torch
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
RATE="$(sed -n 's/^bf16 matmul 8192^3: \([0-9.]*\) TFLOP\/s$/\1/p' "$LOG" | tail -1)"

section "4. bf16 MoE layer rows (forward + backward, autocast over fp32 parameters; peers n/a if they fail)"
step 90 "E=8 row" "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 3 \
    --tokens 16384 --hidden 4096 --ffn 14336 --experts 8 --k 2 \
    --variants dense moetrain moetrain-cf1.25 deepspeed transformers
step 60 "E=64 row" "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 3 \
    --tokens 16384 --hidden 2048 --ffn 1408 --experts 64 --k 6 \
    --variants dense moetrain moetrain-cf1.25 deepspeed

section "5. --bf16 training, h200 config (5 warm-up + 25 timed steps)"
step 180 "h200 training" "$PYTHON" benchmarks/train_throughput.py --configs h200 --device cuda --bf16 \
    --data corpus --no-peer --warmup 5 --steps 25 ${RATE:+--matmul-tflops "$RATE"}

section "6. the cost model beside the measured step (MODELLED rows: benchmarks/gpu_cost_model.py)"
CARD="$(sed -n 's/^device NVIDIA \(H[0-9]*\).*/\1/p' "$LOG" | head -1 | tr 'A-Z' 'a-z')"
ROOFLINE="${GPU_ROOFLINE:-}"
for candidate in shared/tools/gpu_roofline.py ../shared/tools/gpu_roofline.py; do
    [ -z "$ROOFLINE" ] && [ -f "$candidate" ] && ROOFLINE="$candidate"
done
if [ -n "$ROOFLINE" ] && [ -n "$CARD" ]; then
    GPU_ROOFLINE="$ROOFLINE" CUDA_VISIBLE_DEVICES="" step 40 "cost model" "$PYTHON" benchmarks/gpu_cost_model.py \
        --config h200 --card "$CARD" --accum 1 --top 0 | grep -E "^(\[NVIDIA|summary|  \|)"
else
    echo "gpu_roofline.py not on this machine: the rows recorded in BENCHMARKS.md (issue 24, modelled)"
fi
"$PYTHON" - "$LOG" "${CARD:-h100}" <<'EOF'
import re, sys
log, card = open(sys.argv[1]).read(), sys.argv[2]
recorded = {"h100": 146.1, "h200": 119.3}  # BENCHMARKS.md, issue 24: h200 config, accumulation 1, modelled
measured = re.findall(r"\[h200\] moetrain step: median (\d+) ms", log)
modelled = re.findall(r"\| 1 \| 16,384 \| ([\d.]+) \|", log)
model_ms = float(modelled[-1]) if modelled else recorded.get(card)
print(f"h200 config, accumulation 1, {card.upper()}: measured {measured[-1] + ' ms' if measured else 'n/a'}, "
      f"modelled {model_ms} ms" + (f", model error {float(measured[-1]) / model_ms - 1:+.0%}"
                                    if measured and model_ms else ""))
EOF

echo "gpu_check status: $STATUS (0: every step ran)"
grep -E "^(torch |device |expert grouped|bf16 |one --bf16|\| |\[h200\]|h200 config|step failed|# peer|PASSED|FAILED|ERROR|SKIPPED|=+ .*(passed|failed|error)|[0-9]+ (passed|failed)|gpu_check status)" \
    "$LOG" > "$OUT_DIR/gpu_check_summary.txt"
exit $STATUS
