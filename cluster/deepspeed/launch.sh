#!/usr/bin/env bash
# Start a DeepSpeed job from a hostfile:  bash cluster/deepspeed/launch.sh SCRIPT.py [ARGS ...]
#
#   BDT_LAUNCHER=node (default): run this on EVERY node (srun, a K8s pod per node, a loop of ssh);
#       it starts this node's ranks only: `deepspeed --no_ssh --node_rank N`. No ssh between nodes.
#       USR1 or TERM to it: SIGTERM to this node's ranks, which save and exit.
#   BDT_LAUNCHER=pdsh: run this ONCE, on the first host; DeepSpeed reaches the other hosts over
#       passwordless ssh (pdsh) and forwards the variables of $DS_ENV_FILE (.deepspeed_env).
#       A TERM to it gives every rank DeepSpeed's fixed 30 s to save before a SIGKILL.
#
# Environment: HOSTFILE (lines "host slots=N"; python -m bdt.cluster.hosts writes one from a
# SLURM allocation), MASTER_ADDR (default: the hostfile's first host), MASTER_PORT (29500),
# NODE_RANK (default: $SLURM_NODEID), DS_ENV_FILE (optional KEY=VALUE lines; applied on every
# node in both modes). Wrap it in `python -m bdt.cluster.resume --` to restart on crashes.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 SCRIPT.py [ARGS ...]" >&2; exit 2; }
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (host slots=N per line)}"
# Read even when MASTER_ADDR is set: `deepspeed` runs a missing hostfile as a one-node job.
FIRST_HOST=$(python -m bdt.cluster.hosts master --hostfile "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n ${DS_ENV_FILE:-} ]]; then  # set but missing (not on a shared filesystem?): refused
  [[ -f $DS_ENV_FILE ]] || {
    echo "DS_ENV_FILE=$DS_ENV_FILE: not a file on $(hostname)" >&2; exit 2; }
  # split at the first '=' (`read` with IFS='=' drops a trailing one); a last line without \n too
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}  # a file written on Windows: DeepSpeed's reader strips the CR too
    [[ $line != *=* || $line == \#* ]] || export "${line%%=*}=${line#*=}"
  done < "$DS_ENV_FILE"
  export DS_ENV_FILE  # pdsh mode: DeepSpeed's runner reads it and exports it on every host
fi
case ${BDT_LAUNCHER:-node} in
  node)
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (0 .. nodes-1) or run under srun}}
    # Under srun this shell is the task, and a stop arrives as the USR1 srun forwards (a TERM of
    # its own srun makes a SIGKILL), to this shell alone or to its process group: DeepSpeed's
    # launchers die of USR1 and give ranks ~30 s after a TERM, so they ignore USR1 and this
    # shell hands the stop to the ranks themselves, then waits for them to save and exit.
    (trap '' USR1; exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@") &
    LAUNCHER=$!
    trap 'python -m bdt.cluster.launch_processes stop "$LAUNCHER" || true' USR1 TERM
    while :; do
      wait "$LAUNCHER" && STATUS=0 || STATUS=$?
      kill -0 "$LAUNCHER" 2>/dev/null || exit "$STATUS"  # `wait` also returns on a trapped signal
    done ;;
  pdsh)
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@" ;;
  *) echo "BDT_LAUNCHER must be node or pdsh, got '$BDT_LAUNCHER'" >&2; exit 2 ;;
esac
