# Shell helpers for the GPU scripts (gpu_check.sh, gpu_quality.sh): stages bounded in time whose
# logs are written into one folder as they run. Source it from the repository root. It defines
# functions only.
#   begin_stages NAME REHEARSAL_SCALE [OUT]
#                                   sets OUT (the log folder: the argument, else $OUT, else
#                                   NAME/<date>), WORK (scratch: $<NAME>_WORK, else a temp dir),
#                                   PY (.venv's python unless $PYTHON), START, LIMIT_SCALE
#                                   ($<NAME>_LIMIT_SCALE, else REHEARSAL_SCALE when REHEARSAL=1:
#                                   a CPU rehearsal is slower than the GPU the limits are for),
#                                   and the environment (repo on PYTHONPATH, no hub, CPU
#                                   DeepSpeed in a rehearsal)
#   stage NAME LIMIT_S COMMAND...   run COMMAND under `timeout -k 10 -s ABRT` (the trainer
#                                   checkpoints on SIGTERM at the next step boundary, so a stuck
#                                   step outlives a plain TERM; ABRT makes `python -X
#                                   faulthandler` print every thread's stack into the log),
#                                   tee it into OUT/NAME.log, append (name, rc, seconds) to
#                                   OUT/stages.tsv; returns COMMAND's status
#   failed_stages                   the names of the stages that failed, space-separated

begin_stages() {
  local name=$1 scale=$2 upper
  upper=$(tr '[:lower:]' '[:upper:]' <<< "$name")
  OUT=${3:-${OUT:-$name/$(date -u +%Y%m%d-%H%M%S)}}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  local work_var=${upper}_WORK scale_var=${upper}_LIMIT_SCALE
  WORK=${!work_var:-$(mktemp -d -t "bdt-$name-XXXXXX")}
  mkdir -p "$WORK"
  PY=${PYTHON:-python}
  if [[ -x .venv/bin/python && -z ${PYTHON:-} ]]; then PY=$PWD/.venv/bin/python; fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
  if ((REHEARSAL)); then export DS_ACCELERATOR=cpu; fi
  START=$SECONDS
  LIMIT_SCALE=${!scale_var:-$((REHEARSAL ? scale : 1))}
  : > "$OUT/stages.tsv"
}

stage() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local t0=$SECONDS
  printf '== [%3ds] %s (limit %ss) -> %s\n' $((SECONDS - START)) "$name" "$limit" "$OUT/$name.log"
  timeout -k 10 -s ABRT "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >> "$OUT/stages.tsv"
  ((rc == 0)) || echo "== $name FAILED (rc $rc; 134 = timed out, stacks above)"
  return "$rc"
}

failed_stages() { awk '$2 != 0 {print $1}' "$OUT/stages.tsv" | tr '\n' ' '; }
