#!/usr/bin/env bash
# Cluster rehearsal: the multi-node flow of cluster/README.md on this machine, with an S3 API
# server (moto) on 127.0.0.1 standing in for the bucket and 2 local CPU ranks for the nodes' GPUs.
#
#   1. moto S3 server on 127.0.0.1, bucket s3://bdt-rehearsal
#   2. bdt data shapes -> $BUCKET/raw/shapes                      (raw webdataset tars)
#   3. a tiny random image tokenizer -> $BUCKET/models/tokenizer, a tiny Qwen3 (local)
#   4. a Ray head on 127.0.0.1; `ray job submit --runtime-env cluster/ray/runtime_env.yaml`
#      -- pipelines/extract_tokens.py -> $BUCKET/tokens
#   5. the SLURM path without SLURM: hostfile + launch variables from a one-node "allocation"
#      (python -m bdt.cluster.hosts slurm), .deepspeed_env, then
#      python -m bdt.cluster.resume -- cluster/deepspeed/launch.sh bdt/train.py ... with
#      checkpoints to $BUCKET/runs/r1/checkpoints, shards read from S3
#   6. the export uploaded to $BUCKET/runs/r1/export
# This script only launches. `make rehearsal` runs it under tests/cluster/test_rehearsal.py,
# which SIGKILLs a training rank once the first checkpoint is complete on S3 and then checks
# that the wrapper relaunched, the trainer resumed from that checkpoint and finished.
# Everything it starts (moto, the Ray head, the training) is stopped by PID at exit.
# Environment: REHEARSAL_DIR=dir keeps the work files there (default: a fresh temp dir, removed
# at the end unless REHEARSAL_KEEP=1); REHEARSAL_S3_ENDPOINT=URL and REHEARSAL_BUCKET=s3://name
# use that S3 server and existing bucket (credentials from the environment) instead of moto;
# REHEARSAL_BACKOFF=s, the resume wrapper's wait before the relaunch (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
# Checked before anything starts: the wrapper refuses a bad one only at step 5, minutes in.
[[ ${REHEARSAL_BACKOFF:-2} =~ ^([0-9]+[.]?[0-9]*|[.][0-9]+)$ ]] \
  || { echo "REHEARSAL_BACKOFF=$REHEARSAL_BACKOFF: give a number of seconds >= 0" >&2; exit 2; }
REPO=$PWD
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
if [[ -x .venv/bin/python ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi

if [[ -n ${REHEARSAL_DIR:-} ]]; then W=$(python -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$REHEARSAL_DIR"); rm -rf "$W"; mkdir -p "$W"
else W=$(mktemp -d /tmp/bdt-rehearsal.XXXXXX); fi
BUCKET=${REHEARSAL_BUCKET:-s3://bdt-rehearsal}
RUN=$BUCKET/runs/r1
START=$SECONDS
log() { printf '\n== rehearsal [%dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
source scripts/local_ray.sh  # free_port, wait_http, start_ray_head / stop_ray (demo.sh uses them too)

MOTO_PID="" WRAPPER_PID=""
stop_pid() {  # PID: TERM, wait up to 60 s, then KILL
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$WRAPPER_PID"
  stop_ray
  stop_pid "$MOTO_PID"
  if [[ -z ${REHEARSAL_DIR:-} && ${REHEARSAL_KEEP:-0} != 1 ]]; then rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the bucket ---------------------------------------------------------------------------------
if [[ -n ${REHEARSAL_S3_ENDPOINT:-} ]]; then
  log "1/6 S3 server $REHEARSAL_S3_ENDPOINT, bucket $BUCKET (work dir $W)"
  export AWS_ENDPOINT_URL_S3=$REHEARSAL_S3_ENDPOINT
else
  S3_PORT=$(free_port)
  log "1/6 moto S3 server on 127.0.0.1:$S3_PORT (work dir $W)"
  python -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$W/moto.log" 2>&1 &
  MOTO_PID=$!
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
  export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT  # botocore (s3fs) reads it in every process
  wait_http "$AWS_ENDPOINT_URL_S3" "$MOTO_PID" "$W/moto.log"
  python -c 'import s3fs, sys; s3fs.S3FileSystem().mkdir(sys.argv[1])' "${BUCKET#s3://}"
fi

# --- 2-3. raw data, image tokenizer, LLM ---------------------------------------------------------------
log "2/6 shapes data -> $BUCKET/raw/shapes"
bdt data shapes --out "$BUCKET/raw/shapes" --num 96 --per-shard 24 --size 64 --seed 0
log "3/6 tiny image tokenizer -> $BUCKET/models/tokenizer; tiny Qwen3 -> $W/llm"
python - "$BUCKET/models/tokenizer" <<'PY'
import sys, torch
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.tokenizer.config import TokenizerConfig
from bdt.tokenizer.io import save_tokenizer
torch.manual_seed(0)  # random weights: the rehearsal tests the plumbing, not image quality
save_tokenizer(BinaryAutoencoder(TokenizerConfig(ch=16, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                                 z_channels=16, norm_groups=4)), sys.argv[1])
PY
python -c 'import s3fs, sys; s3fs.S3FileSystem().get(sys.argv[1], sys.argv[2], recursive=True)' \
  "${BUCKET#s3://}/raw/shapes/" "$W/captions/"
bdt model init-tiny --captions-from "$W/captions" --out "$W/llm" --hidden 32 --layers 2 --heads 2 \
  --kv-heads 1 --intermediate 64 --vocab-size 384

# --- 4. pre-extraction through `ray job submit` -----------------------------------------------------
log "4/6 Ray head on 127.0.0.1; ray job submit pipelines/extract_tokens.py -> $BUCKET/tokens"
# The cluster job's runtime env as it is; the endpoint and keys reach the job from the head's
# environment, as a site's nodes carry theirs.
start_ray_head "$W/ray-head.log"
ray job submit --address "$RAY_DASHBOARD" --runtime-env cluster/ray/runtime_env.yaml -- \
  python pipelines/extract_tokens.py --config configs/extract/demo.yaml \
  "inputs=$BUCKET/raw/shapes/shapes-*.tar" "output=$BUCKET/tokens" \
  "tokenizer=$BUCKET/models/tokenizer" "stages=[{resolution: 64, buckets: [[64, 64]]}]" min_side=32
stop_ray

# --- 5. training on S3 through the resume wrapper ------------------------------------------------------
log "5/6 training: hostfile from a one-node allocation, 2 ranks, checkpoints -> $RUN/checkpoints"
# in two steps: `eval "$(cmd)"` succeeds when cmd fails, and set -e would not stop
LAUNCH_VARS=$(SLURM_JOB_NODELIST=localhost SLURM_JOB_ID=$$ SLURM_GPUS_ON_NODE=2 \
  python -m bdt.cluster.hosts slurm --hostfile "$W/hostfile")
eval "$LAUNCH_VARS"
export HOSTFILE=$W/hostfile MASTER_ADDR=127.0.0.1 MASTER_PORT=$(free_port) NODE_RANK=0
python -m bdt.cluster.hosts ds-env --out "$W/.deepspeed_env"
export DS_ENV_FILE=$W/.deepspeed_env
echo "hostfile: $(cat "$HOSTFILE"); $NNODES node x $SLOTS ranks; .deepspeed_env: $(wc -l < "$DS_ENV_FILE") variables"
python -m bdt.cluster.resume --max-restarts 2 --backoff "${REHEARSAL_BACKOFF:-2}" -- \
  bash cluster/deepspeed/launch.sh bdt/train.py --config configs/train/tiny.yaml \
  run_dir="$W/run" checkpoint.dir="$RUN/checkpoints" model.backbone.path="$W/llm" \
  data.root="$BUCKET/tokens" data.tokenizer="$BUCKET/models/tokenizer" \
  stages.0.steps=12 checkpoint.every=3 > "$W/train.log" 2>&1 &
WRAPPER_PID=$!
STATUS=0
wait "$WRAPPER_PID" || STATUS=$?
WRAPPER_PID=""
grep '^\[bdt.resume' "$W/train.log" || true
if (( STATUS != 0 )); then tail -40 "$W/train.log"; echo "the wrapper exited $STATUS" >&2; exit 1; fi

# --- 6. export ----------------------------------------------------------------------------------------
log "6/6 export -> $RUN/export"
python -c 'import s3fs, sys; s3fs.S3FileSystem().put(sys.argv[1], sys.argv[2], recursive=True)' \
  "$W/run/export" "$RUN/export"
log "done in $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s"
