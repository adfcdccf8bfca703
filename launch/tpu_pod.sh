#!/usr/bin/env bash
# maxlm on a Cloud TPU VM pod slice: copy this checkout to every worker, install it, run on all workers at once.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh run.dir=/mnt/shared/runs/mile_7b   # install + run
#   TPU_NAME=... ZONE=... SKIP_INSTALL=1 CONFIG=mile_1b launch/tpu_pod.sh run.dir=... train.steps=100 optim.warmup_steps=10
#   TPU_NAME=... ZONE=... CREATE=1 ACCELERATOR_TYPE=v5p-128 RUNTIME_VERSION=v2-alpha-tpuv5 SPOT=1 \
#     launch/tpu_pod.sh run.dir=...                          # queue for the slice first (queued resources)
#   TPU_NAME=... ZONE=... DETACH=1 launch/tpu_pod.sh ...     # run in the background, log in ~/maxlm-train.log
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh --stop           # Ctrl-C on every worker: save, exit 130
#
# On Cloud TPU, jax.distributed.initialize() takes coordinator, process count and id from the TPU metadata.
# run.dir must be a directory every worker mounts (Filestore, gcsfuse): all workers write each checkpoint, so this
# script refuses a run without an absolute run.dir (gs:// run directories are being added to maxlm; until then the
# examples use a shared mount).
#
# Retries (foreground runs): when the run fails (a worker preempted or restarted for maintenance: maxlm saved on the
# SIGTERM and exited 143, or the VMs went away) it is started again up to RETRIES times (default 3), RETRY_WAIT
# seconds apart, and resumes from its newest checkpoint; with CREATE=1 a slice that is no longer ACTIVE is queued
# for again (and reinstalled) first. A config error (exit 2) and --stop (exit 130) end the script at once.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
CONFIG="${CONFIG:-mile_7b}"
PYTHON="${PYTHON:-python3}"            # on the workers; jax 0.10+ needs Python >= 3.11
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10,<0.12}"
RETRIES="${RETRIES:-3}"
RETRY_WAIT="${RETRY_WAIT:-60}"
QR_ID="${QR_ID:-$TPU_NAME-qr}"          # the queued resource CREATE=1 makes
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

tpu() {  # tpu ssh|scp ARGS...: one gcloud command on every worker
  local verb=$1; shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all
}

queued() {  # queued ACTION ARGS...: gcloud compute tpus queued-resources ACTION QR_ID ...
  local action=$1; shift
  gcloud compute tpus queued-resources "$action" "$QR_ID" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} "$@"
}

ensure_slice() {  # with CREATE=1: queue for the slice unless it is ACTIVE, then wait until it is; 0 = (re)created
  local state
  state="$(queued describe --format='value(state.state)' 2>/dev/null || true)"
  [[ "$state" == ACTIVE ]] && return 1
  if [[ -n "$state" ]]; then  # SUSPENDED (preempted), FAILED, ...: delete it and its TPU, then queue again
    echo "maxlm: queued resource $QR_ID is $state: recreating it" >&2
    queued delete --force --quiet
  fi
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5p-128) with CREATE=1}"
  : "${RUNTIME_VERSION:?set RUNTIME_VERSION (e.g. v2-alpha-tpuv5) with CREATE=1}"
  queued create --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${SPOT:+--spot} || return 2
  until [[ "$(queued describe --format='value(state.state)')" == ACTIVE ]]; do
    state="$(queued describe --format='value(state.state)')"
    if [[ "$state" == FAILED || "$state" == SUSPENDED ]]; then
      echo "maxlm: queued resource $QR_ID is $state" >&2
      return 2
    fi
    sleep 30
  done
  return 0
}

install() {
  local tmp archive
  tmp="$(mktemp -d)"
  archive="$tmp/maxlm-src.tgz"
  tar -czf "$archive" -C "$ROOT" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=.venv \
    --exclude=.pytest_cache .
  tpu scp "$archive" "$TPU_NAME:maxlm-src.tgz"
  rm -rf "$tmp"
  tpu ssh "$TPU_NAME" --command="set -e; rm -rf ~/maxlm && mkdir -p ~/maxlm && tar -xzf ~/maxlm-src.tgz -C ~/maxlm \
    && $PYTHON -m pip install -q '$JAX_SPEC' -e ~/maxlm"
}

if [[ "${1:-}" == "--stop" ]]; then
  # shellcheck disable=SC2016  # expanded by the workers' shell
  tpu ssh "$TPU_NAME" --command='[ -f ~/maxlm-train.pid ] && kill -INT "$(cat ~/maxlm-train.pid)" || true'
  exit 0
fi

if ! printf '%s\n' "$@" | grep -Eq '^run\.dir=(/|gs://)'; then
  echo "maxlm: tpu_pod.sh needs run.dir=/an/absolute/path that every worker mounts (Filestore, gcsfuse), or gs://" \
       "once maxlm supports it: each worker writes its shards of every checkpoint there" >&2
  exit 2
fi

train="$PYTHON -m maxlm.train $(printf '%q ' --config="$CONFIG" --distributed --preempt-exit-code=143 "$@")"
if [[ -n "${DETACH:-}" ]]; then
  if [[ -n "${CREATE:-}" ]]; then ensure_slice || [[ $? == 1 ]]; fi
  [[ -n "${SKIP_INSTALL:-}" ]] || install
  tpu ssh "$TPU_NAME" --command="cd ~/maxlm && { nohup $train > ~/maxlm-train.log 2>&1 < /dev/null & \
    echo \$! > ~/maxlm-train.pid; }"
  exit 0
fi

installed=""
for ((attempt = 0; ; attempt++)); do
  if [[ -n "${CREATE:-}" ]]; then
    created=0
    ensure_slice || created=$?
    [[ "$created" == 2 ]] && exit 1
    [[ "$created" == 0 ]] && installed=""  # a new slice: nothing is installed on it
  fi
  if [[ -z "$installed" && -z "${SKIP_INSTALL:-}" ]]; then
    install
  fi
  installed=1
  status=0
  tpu ssh "$TPU_NAME" --command="cd ~/maxlm && echo \$\$ > ~/maxlm-train.pid && exec $train" || status=$?
  if [[ "$status" == 0 || "$status" == 2 || "$status" == 130 || "$attempt" -ge "$RETRIES" ]]; then
    exit "$status"
  fi
  echo "maxlm: the run stopped with exit $status; retry $((attempt + 1)) of $RETRIES in ${RETRY_WAIT}s" >&2
  sleep "$RETRY_WAIT"
done
