#!/usr/bin/env bash
# A DeepSeek-V3-style MoE in miniature, trained on the built-in corpus with Megatron-Core's flag names:
# fine-grained experts (32 of width 128, top-6, at the default config's active FFN width of 1024 with
# the shared expert), sigmoid scores with the aux-loss-free expert bias, group-limited routing (8 groups,
# each token picks from its 4 best), a small sequence-wise balance loss, one shared expert, routing
# weights scaled by 2.5, no token dropping. Extra flags are passed on (e.g. --train-iters 100).
set -euo pipefail
exec python -m moetrain train \
  --num-experts 32 --moe-router-topk 6 --moe-ffn-hidden-size 128 \
  --num-shared-experts 1 --moe-shared-expert-intermediate-size 256 \
  --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 \
  --moe-router-num-groups 8 --moe-router-group-topk 4 \
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 \
  --moe-router-topk-scaling-factor 2.5 --disable-moe-token-dropping \
  --save runs/deepseek_v3_tiny "$@"
