"""The real cluster path: `ray start --head` on 127.0.0.1, then `ray job submit --working-dir .`.

Slow by nature (a Ray head with its dashboard, a job upload): about 30-60 s on 2 cores, so it is
the only test of this kind. The head runs with `--block` in its own session and is stopped by
signalling that session (never `ray stop`, which would also stop Ray instances of other processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from extract_rawdata import good_samples, write_tar

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               # Ray 2.60 heads require a token; the CLI only sends one in token mode. `ray start`
               # never creates it (only ray.init() does), so the test brings its own: a fresh
               # machine has no ~/.ray/auth_token.
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    dash = _free_port()
    cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--node-ip-address", "127.0.0.1", "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(_free_port()),
           "--ray-client-server-port", str(_free_port()), "--disable-usage-stats"]
    log = open(tmp_path / "ray-head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # any HTTP answer (e.g. 401 under token auth): it is up
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not come up: " + (tmp_path / "ray-head.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url, env
    finally:
        head.terminate()  # --block: the head shuts its Ray processes down on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the session we started (raylet, gcs, workers) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def test_ray_job_submit_runs_the_pipeline(tmp_path, tiny_tokenizer, ray_head):
    url, env = ray_head
    for i in range(2):
        write_tar(str(tmp_path / f"raw-{i}.tar"), good_samples(f"j{i}", 5, 10 * i))
    out = tmp_path / "tokens"
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
           "python", "pipelines/extract_tokens.py", "--config", "configs/extract/shapes.yaml",
           f"inputs={tmp_path}/raw-*.tar", f"output={out}", f"tokenizer={tiny_tokenizer}", "min_side=16",
           "stages=[{resolution: 32}]", "batch_size=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 32: inputs 10 = written 10 + rejected 0 [ok]" in proc.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["summary"]["done_units"] == 2 and index["stages"]["32"]["totals"]["samples"] == 10
    assert (out / "config.yaml").exists() and "resolution: 32" in (out / "config.yaml").read_text()
