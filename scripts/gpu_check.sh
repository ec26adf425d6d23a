#!/usr/bin/env bash
# bdt on a new CUDA machine, in one command and at most 9 minutes (issue 16 part 4):
#
#   scripts/gpu_check.sh [OUT]            OUT: the folder for logs and results (default $OUT,
#                                         else gpu_check/<date>); data and runs go to a scratch
#                                         folder ($GPU_CHECK_WORK, else a temp dir), removed at
#                                         the end unless GPU_CHECK_KEEP=1
#   GPU_CHECK_COMPILE=1 scripts/gpu_check.sh   also the fastest backend with compiled decoder
#                                         layers and head (the trainer's compile.enabled;
#                                         Inductor builds them): the throughput stage gets 150 s
#                                         more, so the check takes up to ~11.5 minutes
#   scripts/gpu_check.sh --cpu-rehearsal [OUT]   the same stages at tiny sizes on CPU, the
#                                         CUDA-only ones skipped (flex and the GPU kernels)
#
# Needs only the repo and a Python with torch and bdt's dependencies, or their wheels in ./wheels
# or $BDT_WHEELS (scripts/offline_wheels.py), installed into the scratch folder (bdt itself is not
# installed: the repo is put on PYTHONPATH; a missing package is named before anything runs).
# Ray is not needed.
# Stages, each bounded by `timeout -k 10 -s ABRT` and logging into OUT/<stage>.log as it runs
# (scripts/bounded_stages.sh: why ABRT and not TERM):
#   env         packages, CUDA device (OUT/env.json)
#   tests       tests/model/test_attention.py on CUDA (its `cuda` tests: real flex compile with
#               backward, real varlen/flash kernels), each test's result in the log as it ends
#   tests_compile  flex inside Inductor-compiled layers (tests/model/test_compile.py): a second
#               cold build, a stage of its own so that either's timeout leaves the other's result
#   images      shapes images (bdt data shapes)
#   tokens      random-weight demo tokenizer -> token shards by the extraction worker's encoder
#               on the GPU (bench/gpu_data.py) + the tiny LLM
#   throughput  the 1.2B configuration per attention backend (and compiled, with
#               GPU_CHECK_COMPILE=1), the best one profiled, the attention kernels alone (bench/gpu_throughput.py -> bench/results/gpu_throughput.json)
#   train_1b    the real trainer on the 1.2B configuration with flex
#               (configs/cluster/gpu_1b_mfu.yaml): steps, MFU, data_wait_frac; with the
#               throughput stage's fastest backend if flex failed or hung there (it would hang
#               here too, for the whole stage)
#   shapes_*    a short shapes training (configs/cluster/gpu_shapes_quality.yaml), bdt eval
#   report      bench/results/gpu_check.json (bench/summary.py shows it beside the CPU rows);
#               also after a signal cut the run short (a `timeout` around the script), as a
#               summary of the stages that ran
# This run's results are copied into OUT/results/ as well (written there alone where the checkout
# is read-only). Exit status: 0 if every stage passed.
set -uo pipefail
CALLER=$PWD  # OUT, $<NAME>_WORK and --tokenizer DIR are paths from here
cd "$(dirname "$0")/.."

REHEARSAL=0
if [[ ${1:-} == --cpu-rehearsal ]]; then REHEARSAL=1; shift; fi
source scripts/bounded_stages.sh  # begin_stages, stage, failed_stages
# The limits below are for a GPU machine; a CPU rehearsal is slower and not held to 9 minutes.
begin_stages gpu_check 6 "${1:-}" || exit 1
PYF=("$PY" -X faulthandler)  # ABRT -> every thread's stack in the log
RESULTS=bench/results
if [[ ! -w $RESULTS ]]; then  # a read-only checkout: the results go to OUT alone
  export BDT_BENCH_RESULTS=$OUT/results
  RESULTS=$BDT_BENCH_RESULTS
  echo "gpu_check: $PWD/bench/results is not writable; results go to $RESULTS"
fi
mkdir -p "$OUT/results"
touch "$WORK/started"
collect() {  # this run's results: a file an earlier run left in bench/results is not this one's
  [[ $RESULTS == "$OUT/results" ]] || find "$RESULTS" -maxdepth 1 -name 'gpu_*.json' \
    -newer "$WORK/started" -exec cp -f -t "$OUT/results" {} +
}

if ((REHEARSAL)); then  # tiny sizes: the plumbing, on CPU
  NUM=400 BACKENDS=sdpa DEVICE=cpu REPORT_NAME=gpu_check_rehearsal
  BENCH=(--budget 1024 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128
         --head-width 64 --head-depth 2 --precision fp32 --steps 2 --warmup 1 --profile-steps 1
         --compile best --name gpu_throughput_rehearsal)
  SMALL=("${REHEARSAL_MODEL[@]}" stages.0.token_budget=1024)
  TRAIN_1B=("${SMALL[@]}" stages.0.steps=4 logging.every=2)
  SHAPES=("${SMALL[@]}" stages.1.token_budget=1024 stages.0.steps=3 stages.1.steps=3
          logging.every=1)
  EVAL=(--per-category 1 --steps 2 --device cpu)
else
  # gpu_throughput.py measures what runs no flex first (flex hung on the first GPU run)
  NUM=3000 BACKENDS=sdpa,varlen,flash,flex DEVICE=cuda REPORT_NAME=gpu_check
  BENCH=(--seconds 100 --compile none)
  TRAIN_1B=(stages.0.steps=60 time_limit_min=1)
  SHAPES=(stages.0.steps=60 stages.1.steps=60 time_limit_min=0.5 logging.every=20)
  EVAL=(--per-category 2 --steps 8 --device cuda)
fi
THROUGHPUT_S=130
if [[ ${GPU_CHECK_COMPILE:-0} == 1 ]] && ! ((REHEARSAL)); then
  BENCH=(--seconds 250 --compile best)
  THROUGHPUT_S=280
fi
CKPT=$WORK
if [[ -d /dev/shm && -w /dev/shm ]]; then
  CKPT=$(mktemp -d -p /dev/shm bdt-gpu-check-XXXXXX)
  SCRATCH+=("$CKPT")
fi
DATA=(model.backbone.path="$WORK/data/llm" data.tokenizer="$WORK/data/tokenizer"
      data.root="$WORK/data/tokens")
# The token shards have no index.json (gpu_data.py calls the extraction worker, not the job):
# each stage reads its family's folder and names no family, which only a manifest can pick.

# Limits: 20 + 75 + 60 + 15 + 30 + 130 + 120 + 45 + 30 + 10 = 535 s, 9 min (GPU_CHECK_COMPILE=1:
# 685 s); a stage that times out adds up to STAGE_KILL_S.
stage env 20 "${PYF[@]}" bench/gpu_check.py env --out "$OUT" $( ((REHEARSAL)) && echo --rehearsal ) || {
  echo "gpu_check: the environment lacks what the check needs (above)"; exit 1; }
stage tests 75 "${PYF[@]}" -m pytest -v -p no:cacheprovider tests/model/test_attention.py
stage tests_compile 60 "${PYF[@]}" -m pytest -v -p no:cacheprovider \
  tests/model/test_compile.py::test_cuda_compiled_flex_layers_compile_once_per_row_length
stage images 15 "${PYF[@]}" -m bdt.cli data shapes --out "$WORK/raw" --num "$NUM" \
  --per-shard $((NUM / 6)) --size 128 --seed 0 --workers 4
stage tokens 30 "${PYF[@]}" bench/gpu_data.py --raw "$WORK/raw" --out "$WORK/data" --device "$DEVICE"
stage throughput "$THROUGHPUT_S" "${PYF[@]}" bench/gpu_throughput.py --llm "$WORK/data/llm" --backends "$BACKENDS" \
  "${BENCH[@]}"
collect
if ! ((REHEARSAL)); then  # the rehearsal's tiny model is sdpa's (REHEARSAL_MODEL)
  THROUGHPUT=$RESULTS/gpu_throughput.json  # this run's alone: an earlier run's says nothing here
  [[ $THROUGHPUT -nt $WORK/started ]] || THROUGHPUT=$WORK/no-throughput-results
  TRAIN_1B+=("model.attn_backend=$("$PY" bench/gpu_check.py backend --results "$THROUGHPUT")")
fi
# gpu_1b_mfu.yaml writes no checkpoint at the end (checkpoint.at_end: ~17 GB of ZeRO-2 state):
# only the metrics matter here.
stage train_1b 120 "${PYF[@]}" bdt/train.py --config configs/train/demo.yaml \
  --config configs/cluster/gpu_1b_mfu.yaml "${DATA[@]}" "run_dir=$WORK/run_1b" \
  "checkpoint.dir=$CKPT/run_1b" "stages.0.shards=$WORK/data/tokens/64/*.tar" "stages.0.family=''" \
  "${TRAIN_1B[@]}"
rm -rf "$CKPT/run_1b"
stage shapes_train 45 "${PYF[@]}" bdt/train.py --config configs/train/demo.yaml \
  --config configs/cluster/gpu_shapes_quality.yaml "${DATA[@]}" "run_dir=$WORK/run_shapes" \
  "checkpoint.dir=$CKPT/run_shapes" "stages.0.shards=$WORK/data/tokens/32/*.tar" \
  "stages.0.family=''" "stages.1.shards=$WORK/data/tokens/64/*.tar" "stages.1.family=''" \
  "${SHAPES[@]}"
stage shapes_eval 30 "${PYF[@]}" -m bdt.cli eval --model "$WORK/run_shapes/export" --size 64 \
  "${EVAL[@]}" --out "$OUT/eval"
stage --always report 10 "${PYF[@]}" bench/gpu_check.py report --out "$OUT" --work "$WORK" --name "$REPORT_NAME"
collect
for run in "$WORK"/run_*; do
  [[ -f $run/metrics.jsonl ]] && cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl"
done

FAILED=$(failed_stages)
printf '== gpu_check done in %d s; logs and results in %s%s\n' $((SECONDS - START)) "$OUT" \
  "${FAILED:+; failed: $FAILED}"
[[ -z $FAILED ]]
