# Shell helpers for the GPU scripts (gpu_check.sh, gpu_quality.sh): stages bounded in time whose
# logs are written into one folder as they run. Source it after setting OUT (the log folder),
# START (=$SECONDS at the start) and LIMIT_SCALE (multiplies every limit; a CPU rehearsal is
# slower than the GPU the limits are for). It defines functions only.
#   stage NAME LIMIT_S COMMAND...   run COMMAND under `timeout -k 10 -s ABRT` (the trainer
#                                   checkpoints on SIGTERM at the next step boundary, so a stuck
#                                   step outlives a plain TERM; ABRT makes `python -X
#                                   faulthandler` print every thread's stack into the log),
#                                   tee it into OUT/NAME.log, append (name, rc, seconds) to
#                                   OUT/stages.tsv; returns COMMAND's status
#   failed_stages                   the names of the stages that failed, space-separated

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
