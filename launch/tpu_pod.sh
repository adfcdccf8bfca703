#!/usr/bin/env bash
# maxlm on a Cloud TPU VM pod slice: copy this checkout to every worker, install it, run on all workers at once.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh run.dir=/mnt/shared/runs/mile_7b   # install + run
#   TPU_NAME=... ZONE=... SKIP_INSTALL=1 CONFIG=mile_1b launch/tpu_pod.sh train.steps=100    # run only
#   TPU_NAME=... ZONE=... DETACH=1 launch/tpu_pod.sh ...     # run in the background, log in ~/maxlm-train.log
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh --stop           # SIGTERM a detached run: it checkpoints and exits
#
# On Cloud TPU, jax.distributed.initialize() takes coordinator, process count and id from the TPU metadata.
# run.dir must be a directory every worker mounts (Filestore, gcsfuse): all workers write each checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
CONFIG="${CONFIG:-mile_7b}"
PYTHON="${PYTHON:-python3}"            # on the workers; jax 0.10+ needs Python >= 3.11
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10,<0.12}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

tpu() {  # tpu ssh|scp ARGS...: one gcloud command on every worker
  local verb=$1; shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all
}

if [[ "${1:-}" == "--stop" ]]; then
  tpu ssh "$TPU_NAME" --command='[ -f ~/maxlm-train.pid ] && kill -TERM "$(cat ~/maxlm-train.pid)" || true'
  exit 0
fi

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  tmp="$(mktemp -d)" && trap 'rm -rf "$tmp"' EXIT
  archive="$tmp/maxlm-src.tgz"
  tar -czf "$archive" -C "$ROOT" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=.venv \
    --exclude=.pytest_cache .
  tpu scp "$archive" "$TPU_NAME:maxlm-src.tgz"
  tpu ssh "$TPU_NAME" --command="set -e; rm -rf ~/maxlm && mkdir -p ~/maxlm && tar -xzf ~/maxlm-src.tgz -C ~/maxlm \
    && $PYTHON -m pip install -q '$JAX_SPEC' -e ~/maxlm"
fi

train="$PYTHON -m maxlm.train $(printf '%q ' --config="$CONFIG" --distributed "$@")"
if [[ -n "${DETACH:-}" ]]; then
  tpu ssh "$TPU_NAME" --command="cd ~/maxlm && { nohup $train > ~/maxlm-train.log 2>&1 < /dev/null & \
    echo \$! > ~/maxlm-train.pid; }"
else
  tpu ssh "$TPU_NAME" --command="cd ~/maxlm && $train"
fi
