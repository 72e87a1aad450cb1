#!/usr/bin/env bash
# Runs train.py on every worker of a Cloud TPU VM (pod slice) with the same config; jax.distributed
# finds the other workers by itself on Cloud TPU.
#
#   usage: scripts/launch_tpu.sh [--dry-run] --tpu NAME --zone ZONE [--project P] --workdir gs://BUCKET/run \
#            --data_dir gs://BUCKET/tfds [--repo URL_OR_PATH] [--setup] -- [train.py args, e.g. --config configs/ema_lm.py:130m]
#
#   --setup     first install the project on every worker (git clone/pull of --repo, then pip install -e ".[tpu]")
#   --dry-run   print the gcloud commands instead of running them
# The checkpoints, metrics and eval results go to --workdir (a bucket, so any worker and any later run
# can read them); C4 must be prepared as TFDS under --data_dir (see README, "Language-model data").
set -euo pipefail
DRY=0; SETUP=0; TPU=""; ZONE=""; PROJECT=""; WORKDIR=""; DATA_DIR=""; REPO_URL=""; DEST='~/ema_jax'
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --setup) SETUP=1; shift ;;
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --data_dir) DATA_DIR=$2; shift 2 ;;
    --repo) REPO_URL=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "launch_tpu.sh: unknown argument $1 (train.py arguments go after --)" >&2; exit 2 ;;
  esac
done
for v in TPU ZONE WORKDIR; do
  if [ -z "${!v}" ]; then echo "launch_tpu.sh: --$(echo $v | tr A-Z a-z) is required" >&2; exit 2; fi
done
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all)
[ -n "$PROJECT" ] && GCLOUD+=(--project "$PROJECT")
TRAIN_ARGS=("$@")
[ -n "$DATA_DIR" ] && TRAIN_ARGS+=("--config.data.data_dir=$DATA_DIR")
quoted=$(printf ' %q' "${TRAIN_ARGS[@]}")
run() {
  if [ "$DRY" -eq 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [ "$SETUP" -eq 1 ]; then
  if [ -z "$REPO_URL" ]; then echo "launch_tpu.sh: --setup needs --repo" >&2; exit 2; fi
  run "${GCLOUD[@]}" --command "set -e; if [ -d $DEST ]; then git -C $DEST pull; else git clone $REPO_URL $DEST; fi; cd $DEST; python3 -m pip install -e '.[tpu]'"
fi
run "${GCLOUD[@]}" --command "cd $DEST && python3 train.py --workdir $WORKDIR$quoted"
