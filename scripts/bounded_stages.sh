# Shell helpers for the GPU scripts (gpu_check.sh, gpu_quality.sh): stages bounded in time whose
# logs are written into one folder as they run. Source it from the repository root. It defines
# functions and two arrays.
#   begin_stages NAME REHEARSAL_SCALE [OUT]
#                                   sets OUT (the log folder: the argument, else $OUT, both from
#                                   the caller's directory $CALLER; else NAME/<date> in the
#                                   checkout), WORK (scratch: $<NAME>_WORK, else a temp dir;
#                                   removed at exit unless $<NAME>_KEEP=1, as is what the script
#                                   adds to the array SCRATCH),
#                                   PY (.venv's python, else python3, unless $PYTHON), START,
#                                   LIMIT_SCALE
#                                   ($<NAME>_LIMIT_SCALE, else REHEARSAL_SCALE when REHEARSAL=1:
#                                   a CPU rehearsal is slower than the GPU the limits are for),
#                                   and the environment (repo on PYTHONPATH, no hub, CPU
#                                   DeepSpeed in a rehearsal); on a machine without bdt's
#                                   packages, the wheels in $BDT_WHEELS (else ./wheels, if there:
#                                   scripts/offline_wheels.py download) are installed into
#                                   WORK/site, next on PYTHONPATH (log: OUT/wheels.log);
#                                   BDT_WHEELS=none installs none (a ./wheels made for another
#                                   machine, on one that has the packages)
#   stage [--always] NAME LIMIT_S COMMAND...
#                                   run COMMAND under `timeout -k $STAGE_KILL_S -s ABRT` (the
#                                   trainer checkpoints on SIGTERM at the next step boundary, so a
#                                   stuck step outlives a plain TERM; ABRT makes `python -X
#                                   faulthandler` print every thread's stack into the log; KILL
#                                   $STAGE_KILL_S seconds later, default 10, if it is still there),
#                                   logging into OUT/NAME.log (shown as it grows), append (name,
#                                   rc, seconds) to OUT/stages.tsv; returns COMMAND's status.
#                                   SIGINT/TERM/HUP to the script end the running stage as its
#                                   timeout would (its process group is its own, which a signal
#                                   to the script's group misses) and skip the stages after it
#                                   but those marked --always (a report of what was measured);
#                                   the script's death by SIGKILL ends the stage (PARENT_DEATH)
#                                   A rerun into the same OUT first removes the last run's logs.
#   failed_stages                   the names of the stages that failed, space-separated
# and REHEARSAL_MODEL: the trainer overrides of a CPU rehearsal's tiny model (hidden 64, a 64-wide
# head, sdpa, fp32) over configs/cluster/gpu_*.yaml; 3 layers over the demo LLM's 2, so that a
# rehearsal overrides the layer count as the GPU configs do (that override once failed to build).

REHEARSAL_MODEL=(threads=2 model.attn_backend=sdpa deepspeed.precision=fp32
  model.backbone.config_overrides.hidden_size=64 model.backbone.config_overrides.num_hidden_layers=3
  model.backbone.config_overrides.num_attention_heads=4
  model.backbone.config_overrides.num_key_value_heads=2 model.backbone.config_overrides.head_dim=16
  model.backbone.config_overrides.intermediate_size=128 model.head.width=64)

# The absolute path of folder $2 (made if need be; relative to $1), if this user can write there.
writable_dir() { (cd "$1" && mkdir -p "$2" && cd "$2" && [[ -w . ]] && pwd); }

begin_stages() {
  local name=$1 scale=$2 upper out=${3:-${OUT:-}} base=${CALLER:-$PWD}
  upper=$(tr '[:lower:]' '[:upper:]' <<< "$name")
  [[ -n $out ]] || out=$name/$(date -u +%Y%m%d-%H%M%S) base=$PWD  # the default: in the checkout
  OUT=$(writable_dir "$base" "$out") \
    || { echo "$name: cannot write logs into $out (name a writable OUT)"; return 1; }
  local work_var=${upper}_WORK scale_var=${upper}_LIMIT_SCALE keep_var=${upper}_KEEP
  LIMIT_SCALE=${!scale_var:-$((REHEARSAL ? scale : 1))}
  STAGE_KILL_S=${STAGE_KILL_S:-10}
  # Checked first: a bad STAGE_KILL_S failed every stage in its timeout (rc 125), and a scale
  # of 1.5 was a bash arithmetic error that ran no stage and failed none (0: no limit at all).
  [[ $LIMIT_SCALE =~ ^[1-9][0-9]*$ ]] \
    || { echo "$name: $scale_var=$LIMIT_SCALE: give a whole number >= 1"; return 1; }
  [[ $STAGE_KILL_S =~ ^([0-9]+[.]?[0-9]*|[.][0-9]+)$ && $STAGE_KILL_S =~ [1-9] ]] \
    || { echo "$name: STAGE_KILL_S=$STAGE_KILL_S: give a number of seconds > 0"; return 1; }
  WORK=${!work_var:-$(mktemp -d -t "bdt-$name-XXXXXX")}
  WORK=$(writable_dir "${CALLER:-$PWD}" "$WORK") \
    || { echo "$name: cannot write scratch into $WORK"; return 1; }
  SCRATCH=()  # removed however the script ends: a failed environment check leaves nothing either
  [[ ${!keep_var:-0} == 1 ]] || SCRATCH+=("$WORK")
  trap 'rm -rf "${SCRATCH[@]}"' EXIT
  PY=${PYTHON:-python3}  # a bare CUDA image (Ubuntu) may have no `python`
  if [[ -x .venv/bin/python && -z ${PYTHON:-} ]]; then PY=$PWD/.venv/bin/python; fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  local wheels=wheels
  if [[ ${BDT_WHEELS:-} == none ]]; then
    wheels=
  elif [[ -n ${BDT_WHEELS:-} ]]; then  # named: it must hold them (else: the env stage's list)
    wheels=$(cd "${CALLER:-$PWD}" && cd "$BDT_WHEELS" && pwd) \
      && compgen -G "$wheels/*.whl" > /dev/null \
      || { echo "$name: BDT_WHEELS=$BDT_WHEELS: no .whl files there"; return 1; }
  fi
  if [[ -n $wheels ]] && compgen -G "$wheels/*.whl" > /dev/null; then
    "$PY" scripts/offline_wheels.py install "$wheels" "$WORK/site" > "$OUT/wheels.log" 2>&1 \
      || { cat "$OUT/wheels.log"; return 1; }
    PYTHONPATH=$PWD:$WORK/site${PYTHONPATH#"$PWD"}
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
  # A stage ended by ABRT would dump core where core dumps are on (common in containers): a
  # file the size of the process (tens of GB for the 1.2B trainer) in the checkout. The stacks
  # are in the log already.
  ulimit -S -c 0
  if ((REHEARSAL)); then export DS_ACCELERATOR=cpu; fi
  START=$SECONDS
  INTERRUPTED= STAGE_PID=
  trap 'interrupt INT' INT
  trap 'interrupt TERM' TERM
  trap 'interrupt HUP' HUP
  # A rerun into the same OUT: the last run's stage logs go, or a stage this run never reaches
  # would show the old run's log beside this run's table.
  if [[ -f $OUT/stages.tsv ]]; then
    cut -f1 "$OUT/stages.tsv" | while read -r old; do rm -f "$OUT/$old.log"; done
  fi
  : > "$OUT/stages.tsv"
  # A SIGKILLed script (no trap runs) would leave its stage to run out its limit, holding the GPU:
  # the stage's timeout gets ABRT when the script dies (setpriv, where util-linux has it).
  PARENT_DEATH=()
  if setpriv --pdeathsig ABRT true 2> /dev/null; then PARENT_DEATH=(setpriv --pdeathsig ABRT); fi
}

stage() {
  local always=0
  if [[ $1 == --always ]]; then always=1; shift; fi
  local name=$1 limit=$(($2 * LIMIT_SCALE)) log=$OUT/$1.log rc tail_pid
  shift 2
  local t0=$SECONDS was=$INTERRUPTED
  if [[ -n $INTERRUPTED ]] && ((!always)); then
    echo "== $name skipped ($INTERRUPTED)"
    return 1
  fi
  printf '== [%3ds] %s (limit %ss) -> %s\n' $((SECONDS - START)) "$name" "$limit" "$log"
  # A file, not a pipe to tee: a process that left the stage's group cannot hold the stage open.
  # Made here: the background job's own redirection may come after tail looks (it then shows
  # nothing of the stage: seen under load).
  : > "$log"
  "${PARENT_DEATH[@]}" timeout -k "$STAGE_KILL_S" -s ABRT "$limit" "$@" >> "$log" 2>&1 < /dev/null &
  STAGE_PID=$!
  tail -n +1 -f -s 0.2 --pid="$STAGE_PID" "$log" &
  tail_pid=$!
  wait "$STAGE_PID"
  rc=$?
  if [[ -n $INTERRUPTED && -z $was ]]; then  # the trap cut this wait short: a clean exit is no pass
    wait "$STAGE_PID"
    rc=$?
    ((rc)) || rc=134
  fi
  STAGE_PID=
  wait "$tail_pid"
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >> "$OUT/stages.tsv"
  ((rc == 0)) || echo "== $name FAILED (rc $rc; 124 = timed out, stacks above; 137 = killed $STAGE_KILL_S s later)"
  return "$rc"
}

# A signal to the script (stopped because a stage looked stuck, often): ABRT to the running
# stage's timeout, which passes it to the stage's group (stacks into the log) and KILLs it
# $STAGE_KILL_S s later; the script then goes on to its end (results, cleanup) with no stage
# but the --always ones.
interrupt() {
  INTERRUPTED="interrupted by SIG$1"
  trap - INT TERM HUP  # a second signal ends the script at once
  echo "== $INTERRUPTED: ending the running stage, skipping the rest"
  if [[ -n $STAGE_PID ]]; then kill -ABRT "$STAGE_PID" 2> /dev/null; fi
}

failed_stages() { awk '$2 != 0 {print $1}' "$OUT/stages.tsv" | tr '\n' ' '; }
