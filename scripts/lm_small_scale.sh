#!/usr/bin/env bash
# Small-scale reproduction of "EMA Is Not All You Need": the tiny EMA LM (three predictors) and the tiny
# GPT baseline, same token budget, trained on ../shared/data/wikipedia (train files), evaluated on its
# validation file and on ../shared/data/c4_sample (evaluation only). Writes results/lm/small_scale.{json,md}.
#   usage: scripts/lm_small_scale.sh [STEPS] [WORKROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
ROOT=${2:-workdirs/lm_small_scale}
COMMON=(--config.steps="$STEPS" --config.eval_every=0 --config.checkpoint_every="$STEPS")
for pred in linear attention attention_history; do
  python train.py --config configs/ema_lm.py:wiki_tiny --workdir "$ROOT/ema_$pred" \
    --config.model.predictor="$pred" "${COMMON[@]}"
done
python train.py --config configs/gpt2.py:wiki_tiny --workdir "$ROOT/gpt" "${COMMON[@]}"
python -m experiments.lm_report --root "$ROOT" --out results/lm/small_scale --command "$0 $*"
