#!/usr/bin/env bash
# A real multi-host run on one machine: N processes x M forced CPU devices, gloo collectives.
#   usage: scripts/launch_local.sh N M train.py-args...
#   e.g.   scripts/launch_local.sh 2 2 --config configs/ema_lm.py:tiny --workdir workdirs/local2x2
# Process 0 prints to the terminal; process i > 0 logs to <workdir or /tmp>/process_<i>.log.
# Exits non-zero if any process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0"; exit 2
fi
N=$1; M=$2; shift 2
PORT=${EMA_JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
LOGDIR=$(python3 - "$@" <<'PY'
import sys
args = sys.argv[1:]
for i, a in enumerate(args):
    if a.startswith("--workdir="): print(a.split("=", 1)[1]); break
    if a == "--workdir" and i + 1 < len(args): print(args[i + 1]); break
else:
    print("/tmp")
PY
)
mkdir -p "$LOGDIR"
pids=()
for ((i = 0; i < N; i++)); do
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$M"
  if [ "$i" -eq 0 ]; then
    python train.py --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" &
  else
    python train.py --coordinator "127.0.0.1:$PORT" --num_processes "$N" --process_id "$i" "$@" \
      > "$LOGDIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
