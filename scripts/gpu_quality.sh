#!/usr/bin/env bash
# What the demo recipe learns on a CUDA machine in a fixed time: the GPU demo's model, scored as
# `make demo` scores, and the learning curve's GPU points (issue 17), in one command without Ray:
#
#   scripts/gpu_quality.sh --tokenizer DIR [OUT]
#   scripts/gpu_quality.sh --cpu-rehearsal --tokenizer DIR [OUT]   tiny sizes on CPU
#
# DIR: a trained demo image tokenizer (`make demo` leaves one in demo/tokenizer/export, 2.3 MB);
# OUT: logs and results (default $OUT, else gpu_quality/<date>). Data and the run go to a scratch
# folder ($GPU_QUALITY_WORK, else a temp dir), removed at the end unless GPU_QUALITY_KEEP=1.
# Knobs (environment): GPU_QUALITY_MIN (minutes of AR training, 6), GPU_QUALITY_NUM (images,
# 30000 as the GPU demo's), GPU_QUALITY_EVAL_EVERY (steps between in-loop evaluations of the
# whole suite: the curve's points along the run; 0 = off; 1000), GPU_QUALITY_PX (64 as the demo;
# 128: a third stage at 128 px (configs/extract/demo_128.yaml, configs/cluster/
# gpu_shapes_quality_128.yaml) until the time limit after 600 steps at 64, sampled and scored at
# 128 px, where the demo tokenizer's reconstructions pass 0.93 of the judge against 0.73 at 64).
# Stages, bounded and logged into OUT/<stage>.log as they run (scripts/bounded_stages.sh):
#   env        the packages and the CUDA device (bench/gpu_check.py env: names what is missing)
#   tokenizer  the image tokenizer DIR loads (its weights fit its config), before any image
#   images     bdt data shapes: NUM captioned images, 128 px, seed 0 (as `make demo` makes them)
#   tokens     the tokenizer's encoder on the GPU writes the 32 and 64 (128) px token shards (the
#              extraction worker called directly: bench/gpu_data.py) + the demo's tiny LLM, whose
#              caption tokenizer the backbone uses
#   train      bdt/train.py, configs/train/demo.yaml + configs/cluster/gpu_shapes_quality.yaml
#              (25M backbone from scratch, 16k-token rows, bf16, EMA): stage "64" at constant
#              lr until time_limit_min=MIN
#   sample     bdt sample on the demo's prompts (scripts/demo_prompts.txt), as make demo draws
#   eval_s0/1  bdt eval, the whole suite at 64 (PX) px, sampling seeds 0 and 1, as make demo scores
# OUT then holds run/metrics.jsonl, eval_s0/, eval_s1/ and samples/; add them to the curve with
#   python bench/learning_curve.py --add-to docs/learning_curve.json \
#     --series "GPU, in-loop" OUT/run --final "GPU" OUT/run OUT/eval_s0 OUT/eval_s1
# Exit status: 0 if every stage passed.
set -uo pipefail
CALLER=$PWD  # OUT, $<NAME>_WORK and --tokenizer DIR are paths from here
cd "$(dirname "$0")/.."

REHEARSAL=0
if [[ ${1:-} == --cpu-rehearsal ]]; then REHEARSAL=1; shift; fi
[[ ${1:-} == --tokenizer && -n ${2:-} ]] || { echo "usage: $0 [--cpu-rehearsal] --tokenizer DIR [OUT]"; exit 2; }
TOKENIZER=$(cd "$CALLER" && cd "$2" && pwd) || exit 2
[[ -f $TOKENIZER/config.json ]] || { echo "$TOKENIZER: no image tokenizer here (config.json)"; exit 2; }
shift 2
PX=${GPU_QUALITY_PX:-64}
[[ $PX == 64 || $PX == 128 ]] || { echo "GPU_QUALITY_PX must be 64 or 128, got '$PX'"; exit 2; }
source scripts/bounded_stages.sh  # begin_stages, stage, failed_stages
begin_stages gpu_quality 4 "${1:-}" || exit 1
PYF=("$PY" -X faulthandler)  # ABRT -> every thread's stack in the log

MIN=${GPU_QUALITY_MIN:-6}
EVAL_EVERY=${GPU_QUALITY_EVAL_EVERY:-1000}
EXTRACT_CONFIGS=() STAGE_ARGS=()
if ((PX == 128)); then
  EXTRACT_CONFIGS=(--config configs/extract/demo_128.yaml)
  STAGE_ARGS=(--config configs/cluster/gpu_shapes_quality_128.yaml
              "stages.2.shards=$WORK/data/tokens/128/*.tar" "stages.2.family=''")
fi
if ((REHEARSAL)); then  # tiny sizes: the plumbing, on CPU
  NUM=${GPU_QUALITY_NUM:-300} MIN=${GPU_QUALITY_MIN:-0.75} EVAL_EVERY=${GPU_QUALITY_EVAL_EVERY:-40}
  DEVICE=cpu
  SMALL=("${REHEARSAL_MODEL[@]}" stages.0.token_budget=1024 stages.1.token_budget=1024
         stages.0.steps=20 logging.every=20 eval.per_category=1 eval.steps=2)
  if ((PX == 128)); then SMALL+=(stages.1.steps=20 stages.2.token_budget=1024); fi
  SAMPLING=(--steps 2 --device cpu)
  EVAL_ARGS=(--per-category 1)
else
  NUM=${GPU_QUALITY_NUM:-30000} DEVICE=cuda SMALL=()
  SAMPLING=(--steps 12 --device cuda)  # the demo's sampling: 12 head steps, CFG 2.0
  EVAL_ARGS=(--per-category 0)
fi
MIN_S=$("$PY" -c "import sys; print(int(float(sys.argv[1]) * 60))" "$MIN")
CKPT=$WORK
if [[ -d /dev/shm && -w /dev/shm ]]; then
  CKPT=$(mktemp -d -p /dev/shm bdt-gpu-quality-XXXXXX)
  SCRATCH+=("$CKPT")
fi
RUN=$WORK/run

# Each stage up to train needs the one before: the first failure ends the chain (its log says
# why). sample and the evaluations need only the export, written whole at the end of training.
stage env 20 "${PYF[@]}" bench/gpu_check.py env --out "$OUT" $( ((REHEARSAL)) && echo --rehearsal ) &&
# The tokenizer's weights against its config (torch only): a folder without them failed at the
# tokens stage, after the images.
stage tokenizer 15 "${PYF[@]}" -c "import sys; from bdt.tokenizer.io import check_tokenizer; \
check_tokenizer(sys.argv[1]); print('image tokenizer', sys.argv[1], 'loads')" "$TOKENIZER" &&
stage images $((30 + NUM / 500)) "${PYF[@]}" -m bdt.cli data shapes --out "$WORK/raw" --num "$NUM" \
  --per-shard $((NUM / 6)) --size 128 --seed 0 --workers 8 &&
stage tokens $((60 + NUM / 250 * PX / 64)) "${PYF[@]}" bench/gpu_data.py --raw "$WORK/raw" \
  --out "$WORK/data" --tokenizer "$TOKENIZER" --device "$DEVICE" "${EXTRACT_CONFIGS[@]}" &&
# The limit adds start-up, the final save and the export to the training minutes.
stage train $((MIN_S + 120)) "${PYF[@]}" bdt/train.py --config configs/train/demo.yaml \
  --config configs/cluster/gpu_shapes_quality.yaml "${STAGE_ARGS[@]}" "run_dir=$RUN" \
  "checkpoint.dir=$CKPT/run" model.backbone.path="$WORK/data/llm" data.tokenizer="$TOKENIZER" \
  "stages.0.shards=$WORK/data/tokens/32/*.tar" "stages.1.shards=$WORK/data/tokens/64/*.tar" \
  "stages.0.family=''" "stages.1.family=''" "time_limit_min=$MIN" "eval.every=$EVAL_EVERY" \
  eval.per_category=0 "eval.width=$PX" "eval.height=$PX" \
  eval.steps=12 eval.cfg_scale=2.0 "${SMALL[@]}"
# One failing does not skip the others, nor does a train stage that failed after its export (a
# kill in the teardown): the scores are what the run is for.
if [[ -f $RUN/export/model_config.yaml ]]; then
  stage sample 60 "${PYF[@]}" -m bdt.cli sample --model "$RUN/export" --size "$PX" --cfg-scale 2.0 \
    "${SAMPLING[@]}" --out "$OUT/samples" --cols 8 --prompts-file scripts/demo_prompts.txt
  for seed in 0 1; do
    stage "eval_s$seed" $((120 * PX / 64)) "${PYF[@]}" -m bdt.cli eval --model "$RUN/export" --size "$PX" \
      --cfg-scale 2.0 "${SAMPLING[@]}" "${EVAL_ARGS[@]}" --seed "$seed" --out "$OUT/eval_s$seed"
  done
else
  echo "== no export in $RUN: sample and eval skipped"
fi
mkdir -p "$OUT/run"
cp -f "$RUN/metrics.jsonl" "$RUN/config.yaml" "$RUN/summary.json" "$OUT/run/" 2>/dev/null
rm -rf "$OUT"/eval_s*/images  # the grid shows them; one PNG per image is too much to carry back

FAILED=$(failed_stages)
printf '== gpu_quality done in %d s; logs and results in %s%s\n' $((SECONDS - START)) "$OUT" \
  "${FAILED:+; failed: $FAILED}"
for seed in 0 1; do
  [[ -f $OUT/eval_s$seed/eval.md ]] && { echo "-- seed $seed"; cat "$OUT/eval_s$seed/eval.md"; }
done
[[ -z $FAILED ]]
