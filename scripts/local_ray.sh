# Shell helpers for scripts that start their own Ray head on 127.0.0.1 (demo.sh,
# cluster_rehearsal.sh). Source it; it defines functions only.
#   start_ray_head LOGFILE [CPUS]   head in its own session (setsid --block), dashboard on a free
#                            port, CPUS logical CPUs (2, a CPU demo's cores: one per actor); sets
#                            RAY_PID and RAY_DASHBOARD (http://127.0.0.1:PORT) once it answers
#   stop_ray                 stops exactly that head (never `ray stop`: other Rays share the machine)

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

http_answers() {  # URL: any HTTP answer counts (401 from a Ray head under token auth: it is up)
  python - "$1" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PY
}

wait_http() {  # URL PID LOGFILE: until URL answers; fails (showing the log) if PID dies first
  for _ in $(seq 180); do
    http_answers "$1" && return 0
    kill -0 "$2" 2>/dev/null || { tail -20 "$3"; return 1; }
    sleep 1
  done
  echo "timed out waiting for $1 (log: $3)" >&2
  return 1
}

# Ray 2.60 in token mode (RAY_AUTH_MODE=token): `ray start --head` refuses to start without a
# token (only ray.init() makes one), and the CLI and jobs must send the same one. A fresh machine
# has none: give this run its own in the environment (nothing written to ~/.ray).
ensure_ray_token() {
  [[ ${RAY_AUTH_MODE:-} == token ]] || return 0
  [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]] && return 0
  RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
  export RAY_AUTH_TOKEN
}

RAY_PID="" RAY_DASHBOARD=""
start_ray_head() {
  local dash cpus=${2:-2}
  ensure_ray_token
  dash=$(free_port)
  # --block keeps the head in this process (its own session), so stop_ray can stop exactly it.
  setsid ray start --head --block --num-cpus "$cpus" --node-ip-address 127.0.0.1 \
    --port "$(free_port)" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
    --disable-usage-stats > "$1" 2>&1 &
  RAY_PID=$!
  RAY_DASHBOARD=http://127.0.0.1:$dash
  wait_http "$RAY_DASHBOARD/api/version" "$RAY_PID" "$1"
}

stop_ray() {
  if [[ -n $RAY_PID ]] && kill -0 "$RAY_PID" 2>/dev/null; then
    kill -TERM "$RAY_PID" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$RAY_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$RAY_PID" 2>/dev/null || true  # what is left of its session
  fi
  RAY_PID=""
}
