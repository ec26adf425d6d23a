"""The cluster rehearsal (scripts/cluster_rehearsal.sh, `make rehearsal`) with a rank killed:
once the first checkpoint is complete on S3, SIGKILL of one training rank; the resume wrapper
relaunches, the trainer resumes from that checkpoint, finishes, and its export reaches S3. Also
the suite's test of `ray start --head` and `ray job submit` running the extraction. Minutes: the
Ray job and two 2-rank DeepSpeed launches."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import s3fs
import yaml

from testkit import REPO, training_ranks

pytestmark = pytest.mark.slow


def _wait_for_complete_checkpoint(fs, root: str, script: subprocess.Popen, log) -> list[str]:
    deadline = time.monotonic() + 900
    while not (complete := fs.glob(f"{root}/step_*/COMPLETE")):
        assert script.poll() is None, f"the rehearsal exited {script.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no complete checkpoint under {root}"
        time.sleep(0.2)
        fs.invalidate_cache()
    return complete


def _kill_highest_rank(script: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while len(ranks := training_ranks(script.pid)) != 2:
        assert time.monotonic() < deadline, [p.pid for p in ranks.values()]
        time.sleep(0.2)
    victim = max(ranks)
    ranks[victim].send_signal(signal.SIGKILL)
    return victim


def test_rehearsal_survives_a_killed_rank(s3_endpoint, s3_bucket, tmp_path):
    work, log = tmp_path / "work", tmp_path / "rehearsal.log"
    remote = f"{s3_bucket}/runs/r1"
    # the venv's tools (bdt, ray, deepspeed) on PATH: a checkout without .venv has them elsewhere
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "REHEARSAL_DIR": str(work), "REHEARSAL_S3_ENDPOINT": s3_endpoint,
           "REHEARSAL_BUCKET": s3_bucket, "REHEARSAL_BACKOFF": "0"}
    with open(log, "w") as out:
        script = subprocess.Popen(["bash", str(REPO / "scripts" / "cluster_rehearsal.sh")],
                                  cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        _wait_for_complete_checkpoint(fs, f"{remote}/checkpoints", script, log)
        assert _kill_highest_rank(script) == 1
        assert script.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if script.poll() is None:  # its EXIT trap stops what it started
            script.send_signal(signal.SIGTERM)
            script.wait(timeout=120)

    # the Ray job (ray job submit --runtime-env cluster/ray/runtime_env.yaml): every sample of
    # the 4 raw shards extracted to S3
    assert "stage 64: inputs 96 = written 96 + rejected 0 [ok]" in log.read_text()
    index = json.loads(fs.cat(f"{s3_bucket}/tokens/index.json"))
    assert index["summary"]["done_units"] == 4 and index["stages"]["64"]["totals"]["samples"] == 96
    assert "resolution: 64" in fs.cat(f"{s3_bucket}/tokens/config.yaml").decode()

    run = work / "run"
    events = [json.loads(line) for line in open(run / "resume.jsonl")]
    assert [e["event"] for e in events] == ["launch", "restart", "launch", "done"], events
    crash = events[1]
    assert crash["exit_code"] != 0 and crash["checkpoint_step"] > 0, crash
    assert crash["delay_s"] == 0  # REHEARSAL_BACKOFF
    resumed = [json.loads(line)["resumed_from_step"] for line in open(run / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert resumed == [crash["checkpoint_step"]]

    steps = yaml.safe_load((run / "config.yaml").read_text())["stages"][0]["steps"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == steps and not summary["stopped"], summary
    complete = sorted(p.split("/")[-2] for p in fs.glob(f"{remote}/checkpoints/step_*/COMPLETE"))
    assert complete[-1] == f"step_{steps:09d}", complete
    local = {str(p.relative_to(run / "export")) for p in (run / "export").rglob("*") if p.is_file()}
    uploaded = {p.split("/export/", 1)[1] for p in fs.find(f"{remote}/export")}
    assert uploaded == local and "model_config.yaml" in local


@pytest.mark.parametrize("backoff", ["abc", "-1", "nan"])
def test_a_bad_backoff_is_named_before_anything_starts(tmp_path, backoff):
    """The wrapper's refusal (or argparse's) came at step 5, after the data and the Ray job."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "REHEARSAL_DIR": str(tmp_path / "work"), "REHEARSAL_BACKOFF": backoff,
           "REHEARSAL_S3_ENDPOINT": "http://127.0.0.1:9"}  # no server: the old script failed
    script = subprocess.Popen(["bash", str(REPO / "scripts" / "cluster_rehearsal.sh")],
                              cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        out, _ = script.communicate(timeout=60)
    finally:
        if script.poll() is None:  # its EXIT trap stops what it started
            script.send_signal(signal.SIGTERM)
            script.wait(timeout=90)
    assert script.returncode == 2, out
    assert out == f"REHEARSAL_BACKOFF={backoff}: give a number of seconds >= 0\n"
