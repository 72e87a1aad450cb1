#!/usr/bin/env bash
# Beyond the papers, language-model view: the tiny EMA LM with fixed traces, with selective traces, the
# two-memory hybrid (fixed traces + attention over the last 32 bytes) and the tiny GPT, at one token budget
# (1000 steps x 16 x 256 bytes), trained on ../shared/data/wikipedia (train files), evaluated on its
# validation file and on ../shared/data/c4_sample. Writes results/lm/beyond.{json,md}.
#   usage: scripts/lm_beyond.sh [STEPS] [WORKROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1000}
ROOT=${2:-workdirs/lm_beyond}
COMMON=(--config.steps="$STEPS" --config.eval_every=0 --config.checkpoint_every="$STEPS")
python train.py --config configs/ema_lm.py:wiki_tiny --workdir "$ROOT/ema_fixed" "${COMMON[@]}"
python train.py --config configs/ema_lm.py:wiki_tiny --workdir "$ROOT/ema_selective" \
  --config.model.trace_kind=selective "${COMMON[@]}"
python train.py --config configs/gpt2.py:wiki_tiny --workdir "$ROOT/gpt" "${COMMON[@]}"
python train.py --config configs/ema_lm.py:wiki_tiny --workdir "$ROOT/ema_hybrid" --config.model.window=32 "${COMMON[@]}"
python -m experiments.lm_report --root "$ROOT" --out results/lm/beyond --command "$0 $*"
