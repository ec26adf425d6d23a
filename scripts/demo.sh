#!/usr/bin/env bash
# The whole bdt job on one CPU machine (2 cores, no GPU), with the commands a cluster user runs:
#
#   1. bdt data shapes            procedural captioned images (webdataset tars)
#   2. tokenizers/train.py        a small binary image tokenizer (DeepSpeed, 2 CPU ranks)
#   3. ray job submit ...         pre-extraction: images -> token shards, 32 and 64 px families
#   4. bdt model init-tiny        a small Qwen3 + SentencePiece tokenizer trained on the captions
#   5. bdt/train.py               AR training, stage "32" then stage "64" (DeepSpeed, 2 CPU ranks)
#   6. bdt sample                 a grid of images for a few prompts
#   7. bdt eval                   the shapes suite, judged: scores per category and overall
#
# Run it as `make demo` or `bash scripts/demo.sh`. Everything goes to $DEMO_DIR (default demo/).
# Re-running resumes: a step whose output is complete is skipped, and the tokenizer and AR
# trainers continue from their newest complete checkpoint. `rm -rf demo` starts over.
# Ctrl-C, a SIGTERM (to this script alone or its process group) or a closed terminal (SIGHUP) stops
# the running step at once, the trainers at a checkpoint; the script exits 130 once the step has
# ended (stop_demo). Under `nohup` the demo goes on after the terminal closes.
#
# Time: the demo has 30 minutes from DEMO_STARTED (epoch seconds; `make demo` passes its own
# start, so the install counts; default: this script's start). AR training gets what the steps
# before it left, less a 2-minute reserve for its start-up and export, the samples and the
# evaluation (its time_limit_min; the tokenizer's is 7 minutes, configs/tokenizer/demo.yaml).
#
# Knobs (environment): DEMO_DIR, DEMO_NUM (images, 6000; 100000 on a GPU), DEMO_EVAL_PER_CATEGORY
# (0 = all 40), DEMO_SAMPLE_STEPS (head sampler steps, 12), DEMO_CFG (guidance, 2.0), and extra key=value
# overrides for the trainers: DEMO_TOKENIZER_ARGS (e.g. "steps=20"), DEMO_TRAIN_ARGS (e.g.
# "stages.0.steps=50 stages.1.steps=50": the AR config has no top-level `steps`).
#
# Wall time in a fresh clone, measured 2026-12-07 on an idle 2-core Intel Xeon (amx_bf16):
# 28 min 34 s with the install (1.6 min): data 7 s, tokenizer 3 min 43 s (capped at 7 min by
# time_limit_min in configs/tokenizer/demo.yaml), Ray extraction 24 s, LLM 6 s, AR training
# 22 min 15 s (22.06 min given; it stopped at step 4824 of 7200), samples 6 s, eval 17 s.
# Scores and what limits them: README ("The demo's quality").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [[ -x .venv/bin/python ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi
# On a machine where torch sees CUDA GPUs the same steps use them, with a bigger AR model
# (configs/train/demo_gpu.yaml; unproven: never run on a GPU yet). DEMO_DEVICE=cpu forces the CPU.
GPUS=0
if [[ ${DEMO_DEVICE:-auto} != cpu ]]; then
  GPUS=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
# No accelerator on CPU, no hub, Ray on loopback only (docs/environment.md); the Makefile sets
# them too.
if ((GPUS > 0)); then
  [[ ${DS_ACCELERATOR:-} == cpu ]] && unset DS_ACCELERATOR
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # Ray 2.60 heads want a token; the CLI sends it
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 ranks x 1 thread on 2 cores

D=$(python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${DEMO_DIR:-demo}")
if ((GPUS > 0)); then
  RANKS=$GPUS
  # 30,000 images the bigger model would see ~80 times in its budget (an estimate); the CPU
  # model stopped improving past ~30 passes over 6,000 (docs/results.md): 100,000, ~24 each.
  NUM=${DEMO_NUM:-100000}
  DATA_WORKERS=$(($(nproc) < 16 ? $(nproc) : 16))
  LLM_ARGS=(--hidden 512 --layers 8 --heads 8 --kv-heads 4 --intermediate 1536)
  TRAIN_CONFIGS=(--config configs/train/demo.yaml --config configs/train/demo_gpu.yaml)
  EXTRACT_ARGS=(gpus_per_actor=1 "num_actors=$GPUS")
  RAY_CPUS=$((GPUS > 2 ? GPUS : 2))  # an actor takes a CPU too: a 2-CPU head hosts 2 of them
else
  RANKS=2  # 2 CPU ranks x 1 thread on 2 cores
  NUM=${DEMO_NUM:-6000}
  DATA_WORKERS=2
  LLM_ARGS=()
  TRAIN_CONFIGS=(--config configs/train/demo.yaml)
  EXTRACT_ARGS=()
  RAY_CPUS=2
fi
EVAL_PER_CATEGORY=${DEMO_EVAL_PER_CATEGORY:-0}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-12}
CFG=${DEMO_CFG:-2.0}
read -r -a TOKENIZER_ARGS <<< "${DEMO_TOKENIZER_ARGS:-}"
read -r -a TRAIN_ARGS <<< "${DEMO_TRAIN_ARGS:-}"
mkdir -p "$D"
START=$SECONDS
DEADLINE=$((${DEMO_STARTED:-$(date +%s)} + 30 * 60))
RESERVE_S=120  # AR start-up and export, samples, eval: ~50 s on a loaded 2-core machine

log() { printf '\n== demo [%dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
source scripts/local_ray.sh  # free_port, start_ray_head / stop_ray (the rehearsal uses them too)
# Set before any step: without a trap a SIGTERM ends this script at once, while its step runs on.
trap stop_ray EXIT
trap 'stop_demo INT' INT
trap 'stop_demo TERM' TERM
trap 'stop_demo HUP' HUP
STEP_PID=""

# [SIG]: pass it on to the running step (none: the step has ended), wait for the step to end
# (the trainers save at their next step boundary, so the demo resumes from there), stop Ray, exit.
stop_demo() {
  # After a hang-up the terminal is gone: a write to it fails (EIO), and under `set -e` a failed
  # printf would end the script before the step has saved. What is left to say goes nowhere.
  if [[ ${1:-} == HUP ]]; then exec > /dev/null 2>&1; fi
  if [[ -n $STEP_PID ]]; then
    kill -"$1" "$STEP_PID" 2> /dev/null || true
    wait "$STEP_PID" || true
  fi
  stop_ray
  exit 130
}

# COMMAND...: run it through scripts/run_to_end.py (which returns once every process the command
# started has ended, and passes this script's signals on to them), in the background so that a
# signal to this script's PID alone reaches stop_demo at once. A step stopped by SIGHUP, SIGINT
# or SIGTERM returns 129, 130 or 143 (run_to_end.py says so whatever the command's status): the
# demo stops then too, as the trap would, whether or not bash ran the trap before `wait` returned
# (under load it once did not, and `set -e` ended the demo with the step's status, 1).
run_to_end() {
  local status=0
  RUN_TO_END_PARENT=$$ python scripts/run_to_end.py "$@" &
  STEP_PID=$!
  wait "$STEP_PID" || status=$?
  STEP_PID=""
  case $status in 129) stop_demo HUP ;; 130 | 143) stop_demo ;; esac
  return "$status"
}

# --- 1. data --------------------------------------------------------------------------------
if [[ -f $D/data/manifest.json ]]; then
  log "1/7 data: $D/data is complete, skipping"
else
  log "1/7 data: $NUM shapes images (128 px) -> $D/data"
  run_to_end bdt data shapes --out "$D/data" --num "$NUM" --per-shard 500 --size 128 --seed 0 --workers "$DATA_WORKERS"
fi

# --- 2. image tokenizer -----------------------------------------------------------------------
if [[ -f $D/tokenizer/export/config.json ]]; then
  log "2/7 tokenizer: $D/tokenizer/export is complete, skipping"
else
  log "2/7 tokenizer: training configs/tokenizer/shapes_d8.yaml on $RANKS ranks -> $D/tokenizer"
  run_to_end deepspeed --num_gpus "$RANKS" --master_port "$(free_port)" tokenizers/train.py \
    --config configs/tokenizer/shapes_d8.yaml --config configs/tokenizer/demo.yaml \
    run_dir="$D/tokenizer" "data.shards=$D/data/shapes-*.tar" "${TOKENIZER_ARGS[@]}"
fi

# --- 3. pre-extraction on a Ray head on 127.0.0.1 ------------------------------------------------
extraction_complete() {
  python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("complete") else 1)' \
    "$D/tokens/index.json" 2>/dev/null
}
if extraction_complete; then
  log "3/7 pre-extraction: $D/tokens is complete, skipping"
else
  log "3/7 pre-extraction: Ray head on 127.0.0.1 (log $D/ray-head.log)"
  # The head has its own session: a SIGKILL of this script's process group, which skips
  # stop_ray, would leave it running. A reaper (the extraction driver's) kills what this script
  # started once it is gone; it watches before the head starts.
  read -r _ < <(setsid python -m bdt.extract.ray_session "$$" < /dev/null 2> /dev/null) || true
  REAPER_PID=$!
  start_ray_head "$D/ray-head.log" "$RAY_CPUS"
  run_to_end ray job submit --address "$RAY_DASHBOARD" --working-dir . -- \
    python pipelines/extract_tokens.py --config configs/extract/demo.yaml \
    "inputs=$D/data/shapes-*.tar" "output=$D/tokens" "tokenizer=$D/tokenizer/export" \
    "${EXTRACT_ARGS[@]}"
  stop_ray
  kill "$REAPER_PID" 2> /dev/null || true
fi

# --- 4. the small LLM -------------------------------------------------------------------------
if [[ -f $D/llm/model.safetensors ]]; then
  log "4/7 LLM: $D/llm is complete, skipping"
else
  log "4/7 LLM: small Qwen3 + SentencePiece tokenizer on the captions -> $D/llm"
  run_to_end bdt model init-tiny --captions-from "$D/data" --out "$D/llm" "${LLM_ARGS[@]}"
fi

# --- 5. AR training, two resolution stages ------------------------------------------------------
if [[ -f $D/run/export/model_config.yaml ]]; then
  log "5/7 training: $D/run/export is complete, skipping"
else
  # At least 2 minutes, however late: a model to sample and evaluate.
  AR_MIN=$(python -c 'import sys, time; print(round(max(2.0, (int(sys.argv[1]) - time.time()) / 60), 2))' \
    $((DEADLINE - RESERVE_S)))
  log "5/7 training: ${TRAIN_CONFIGS[*]}, stages 32 -> 64 px, on $RANKS ranks, $AR_MIN min -> $D/run"
  run_to_end deepspeed --num_gpus "$RANKS" --master_port "$(free_port)" bdt/train.py "${TRAIN_CONFIGS[@]}" \
    run_dir="$D/run" model.backbone.path="$D/llm" data.tokenizer="$D/tokenizer/export" \
    data.root="$D/tokens" "time_limit_min=$AR_MIN" "${TRAIN_ARGS[@]}"
fi

# --- 6. samples ---------------------------------------------------------------------------------
if [[ -f $D/samples/samples.json ]]; then
  log "6/7 samples: $D/samples is complete, skipping"
else
  log "6/7 samples: 16 prompts at 64 px -> $D/samples"
  run_to_end bdt sample --model "$D/run/export" --size 64 --steps "$SAMPLE_STEPS" --cfg-scale "$CFG" \
    --out "$D/samples" --cols 8 --prompts-file scripts/demo_prompts.txt
fi

# --- 7. evaluation --------------------------------------------------------------------------------
if [[ -f $D/eval/eval.json ]]; then
  log "7/7 eval: $D/eval is complete, skipping"
else
  log "7/7 eval: the shapes suite at 64 px, judged -> $D/eval"
  run_to_end bdt eval --model "$D/run/export" --size 64 --steps "$SAMPLE_STEPS" --cfg-scale "$CFG" \
    --per-category "$EVAL_PER_CATEGORY" --out "$D/eval"
fi

log "done in $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s. Scores:"
cat "$D/eval/eval.md"
cat <<EOF

Pictures and outputs:
  samples grid        $D/samples/grid.png (one PNG per prompt beside it)
  eval grid           $D/eval/grid.png (green frame = the judge passed the image, red = failed)
  eval scores         $D/eval/eval.json, $D/eval/eval.md
  tokenizer recon.    $D/tokenizer/images/
  AR model (export)   $D/run/export   (sample more: bdt sample --model $D/run/export --prompt "...")
  training logs       $D/run/metrics.jsonl, $D/tokenizer/metrics.jsonl
EOF
