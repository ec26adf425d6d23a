#!/usr/bin/env bash
# Cluster rehearsal: the multi-node flow of cluster/README.md on this machine, with an S3 API
# server (moto) on 127.0.0.1 standing in for the bucket and 2 local CPU ranks for the nodes' GPUs.
#
#   1. moto S3 server on 127.0.0.1, bucket s3://bdt-rehearsal
#   2. bdt data shapes -> s3://bdt-rehearsal/raw/shapes            (raw webdataset tars)
#   3. a tiny random image tokenizer -> s3://bdt-rehearsal/models/tokenizer, a tiny Qwen3 (local)
#   4. a Ray head on 127.0.0.1; `ray job submit --runtime-env <cluster/ray/runtime_env.yaml + the
#      S3 endpoint>` -- pipelines/extract_tokens.py -> s3://bdt-rehearsal/tokens
#   5. the SLURM path without SLURM: hostfile + launch variables from a one-node "allocation"
#      (python -m bdt.cluster.hosts slurm), .deepspeed_env, then
#      python -m bdt.cluster.resume -- cluster/deepspeed/launch.sh bdt/train.py ... with
#      checkpoints to s3://bdt-rehearsal/runs/r1/checkpoints, shards read from S3
#   6. SIGKILL of one training rank once the first checkpoint is complete on S3; the wrapper
#      relaunches, the trainer resumes from that checkpoint and finishes
#   7. checks (resume log, metrics, S3 checkpoints), export uploaded to S3
# Everything it starts (moto, the Ray head, the training) is stopped by PID at exit.
# Run it as `make rehearsal` or `bash scripts/cluster_rehearsal.sh`; REHEARSAL_DIR=dir keeps the
# work files there (default: a fresh temp dir, removed at the end unless REHEARSAL_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
if [[ -x .venv/bin/python ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi

if [[ -n ${REHEARSAL_DIR:-} ]]; then W=$(python -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$REHEARSAL_DIR"); rm -rf "$W"; mkdir -p "$W"
else W=$(mktemp -d /tmp/bdt-rehearsal.XXXXXX); fi
BUCKET=s3://bdt-rehearsal
RUN=$BUCKET/runs/r1
START=$SECONDS
log() { printf '\n== rehearsal [%dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
source scripts/local_ray.sh  # free_port, wait_http, start_ray_head / stop_ray (demo.sh uses them too)

MOTO_PID="" WRAPPER_PID=""
stop_pid() {  # PID: TERM, wait up to 60 s, then KILL
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
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
S3_PORT=$(free_port)
log "1/7 moto S3 server on 127.0.0.1:$S3_PORT (work dir $W)"
python -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$W/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT  # botocore (s3fs) reads it in every process
wait_http "$AWS_ENDPOINT_URL_S3" "$MOTO_PID" "$W/moto.log"
python -c 'import s3fs, sys; s3fs.S3FileSystem().mkdir(sys.argv[1])' "${BUCKET#s3://}"

# --- 2-3. raw data, image tokenizer, LLM ---------------------------------------------------------------
log "2/7 shapes data -> $BUCKET/raw/shapes"
bdt data shapes --out "$BUCKET/raw/shapes" --num 96 --per-shard 24 --size 64 --seed 0
log "3/7 tiny image tokenizer -> $BUCKET/models/tokenizer; tiny Qwen3 -> $W/llm"
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
log "4/7 Ray head on 127.0.0.1; ray job submit pipelines/extract_tokens.py -> $BUCKET/tokens"
# The runtime env of a cluster job (cluster/ray/runtime_env.yaml) plus this bucket's endpoint and
# test keys, as a site would add its endpoint (real keys come from the nodes' role instead).
python - cluster/ray/runtime_env.yaml "$W/runtime_env.yaml" <<'PY'
import os, sys, yaml
env = yaml.safe_load(open(sys.argv[1]))
env["env_vars"].update({k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY")})
yaml.safe_dump(env, open(sys.argv[2], "w"))
PY
start_ray_head "$W/ray-head.log"
ray job submit --address "$RAY_DASHBOARD" --runtime-env "$W/runtime_env.yaml" -- \
  python pipelines/extract_tokens.py --config configs/extract/demo.yaml \
  "inputs=$BUCKET/raw/shapes/shapes-*.tar" "output=$BUCKET/tokens" \
  "tokenizer=$BUCKET/models/tokenizer" "stages=[{resolution: 64, buckets: [[64, 64]]}]" min_side=32
stop_ray

# --- 5. training on S3 through the resume wrapper ------------------------------------------------------
log "5/7 training: hostfile from a one-node allocation, 2 ranks, checkpoints -> $RUN/checkpoints"
eval "$(SLURM_JOB_NODELIST=localhost SLURM_JOB_ID=$$ SLURM_GPUS_ON_NODE=2 \
  python -m bdt.cluster.hosts slurm --hostfile "$W/hostfile")"
export HOSTFILE=$W/hostfile MASTER_ADDR=127.0.0.1 MASTER_PORT=$(free_port) NODE_RANK=0
python -m bdt.cluster.hosts ds-env --out "$W/.deepspeed_env"
export DS_ENV_FILE=$W/.deepspeed_env
echo "hostfile: $(cat "$HOSTFILE"); $NNODES node x $SLOTS ranks; .deepspeed_env: $(wc -l < "$DS_ENV_FILE") variables"
STEPS=12
python -m bdt.cluster.resume --max-restarts 2 --backoff 2 -- \
  bash cluster/deepspeed/launch.sh bdt/train.py --config configs/train/tiny.yaml \
  run_dir="$W/run" checkpoint.dir="$RUN/checkpoints" model.backbone.path="$W/llm" \
  data.root="$BUCKET/tokens" data.tokenizer="$BUCKET/models/tokenizer" \
  stages.0.steps=$STEPS checkpoint.every=3 > "$W/train.log" 2>&1 &
WRAPPER_PID=$!

# --- 6. kill a rank mid-run -------------------------------------------------------------------------------
log "6/7 waiting for the first complete checkpoint on S3, then SIGKILL of one rank"
python - "$RUN/checkpoints" "$WRAPPER_PID" <<'PY'
import signal, sys, time
import psutil, s3fs
root, wrapper = sys.argv[1], int(sys.argv[2])
fs = s3fs.S3FileSystem()
deadline = time.monotonic() + 900
while not fs.glob(f"{root}/step_*/COMPLETE"):
    if time.monotonic() > deadline or not psutil.pid_exists(wrapper):
        sys.exit(f"no complete checkpoint under {root} (see train.log)")
    time.sleep(0.2)
    fs.invalidate_cache()
ranks = [p for p in psutil.Process(wrapper).children(recursive=True)
         if "RANK" in p.environ() and "train.py" in " ".join(p.cmdline())]
victim = max(ranks, key=lambda p: int(p.environ()["RANK"]))
print(f"complete: {fs.glob(f'{root}/step_*/COMPLETE')}; SIGKILL rank {victim.environ()['RANK']} "
      f"(pid {victim.pid})", flush=True)
victim.send_signal(signal.SIGKILL)
PY
STATUS=0
wait "$WRAPPER_PID" || STATUS=$?
WRAPPER_PID=""
grep '^\[bdt.resume' "$W/train.log" || true
if (( STATUS != 0 )); then tail -40 "$W/train.log"; echo "the wrapper exited $STATUS" >&2; exit 1; fi

# --- 7. checks and export ----------------------------------------------------------------------------------
log "7/7 checks; export -> $RUN/export"
python - "$W/run" "$RUN" "$STEPS" <<'PY'
import json, sys
import s3fs
run_dir, remote, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
events = [json.loads(line) for line in open(f"{run_dir}/resume.jsonl")]
kinds = [e["event"] for e in events]
assert kinds == ["launch", "restart", "launch", "done"], kinds
crash = events[1]
resumed = [json.loads(line)["resumed_from_step"] for line in open(f"{run_dir}/metrics.jsonl")
           if "resumed_from_step" in line]
assert resumed == [crash["checkpoint_step"]], (resumed, crash)
summary = json.load(open(f"{run_dir}/summary.json"))
assert summary["step"] == steps and not summary["stopped"], summary
fs = s3fs.S3FileSystem()
complete = sorted(p.split("/")[-2] for p in fs.glob(f"{remote}/checkpoints/step_*/COMPLETE"))
assert complete and complete[-1] == f"step_{steps:09d}", complete
fs.put(f"{run_dir}/export", f"{remote}/export", recursive=True)
print(f"crash: exit {crash['exit_code']} after the checkpoint of step {crash['checkpoint_step']}; "
      f"resumed there; finished at step {summary['step']}; complete checkpoints on S3: {complete}; "
      f"export: {len(fs.find(remote + '/export'))} files")
PY
log "done in $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s"
