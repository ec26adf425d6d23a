"""scripts/gpu_check.sh around its stages, on a copy of its files with a stand-in for Python: which
results it keeps, and what a signal leaves behind. (The stages themselves: --cpu-rehearsal.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from testkit import REPO

# Records each call; the throughput stage writes its result, `train.py` sleeps (STALL), the
# report or the environment check fails (REPORT_FAILS, ENV_FAILS), every other stage passes.
STUB = f"""#!{sys.executable}
import os, sys, time
args = " ".join(sys.argv[1:])
with open(os.environ["CALLS"], "a") as f:
    print(args, file=f, flush=True)
results = os.environ.get("BDT_BENCH_RESULTS") or "bench/results"
if "gpu_throughput.py" in args:
    open(os.path.join(results, "gpu_throughput_rehearsal.json"), "w").write("{{}}")
if "train.py" in args and os.environ.get("STALL"):
    time.sleep(60)
if "gpu_check.py report" in args and os.environ.get("REPORT_FAILS"):
    sys.exit(1)
if "gpu_check.py env" in args and os.environ.get("ENV_FAILS"):
    sys.exit(1)
"""


def _checkout(tmp_path):
    """The script's files in a checkout of their own, an earlier run's result in bench/results."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "bench" / "results").mkdir(parents=True)
    for name in ("gpu_check.sh", "bounded_stages.sh"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    stale = repo / "bench" / "results" / "gpu_check_rehearsal.json"
    stale.write_text(json.dumps({"goals": [], "stages": "an earlier run's"}))
    os.utime(stale, (time.time() - 3600,) * 2)
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return repo, stub


def _run_env(tmp_path, **env) -> dict:
    """The stub as Python, none of the caller's OUT, results, keep or wheels settings."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("OUT", "BDT_BENCH_RESULTS", "GPU_CHECK_KEEP", "BDT_WHEELS")}
    return dict(out, PYTHON=str(tmp_path / "python"), CALLS=str(tmp_path / "calls"),
                GPU_CHECK_WORK=str(tmp_path / "work"), **env)


def _run(tmp_path, **env):
    repo, _ = _checkout(tmp_path)
    return subprocess.Popen(["bash", str(repo / "scripts" / "gpu_check.sh"), "--cpu-rehearsal",
                             str(tmp_path / "out")], env=_run_env(tmp_path, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_out_results_hold_this_runs_files_only(tmp_path):
    """A report stage that failed left OUT/results/gpu_check*.json of an earlier run in the
    checkout: copied as this run's, it said every stage passed."""
    proc = _run(tmp_path, REPORT_FAILS="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "failed: report" in out, out
    assert sorted(os.listdir(tmp_path / "out" / "results")) == ["gpu_throughput_rehearsal.json"]


@pytest.mark.slow
def test_sigterm_mid_stage_still_cleans_up_and_says_it_failed(tmp_path):
    """A SIGTERM to the script's group killed the script where it stood: the stage ran on, and
    its scratch folder and the /dev/shm one for ~14 GB of 1.2B checkpoints stayed."""
    proc = _run(tmp_path, STALL="1")
    calls = tmp_path / "calls"
    for _ in range(300):
        if calls.exists() and "train.py" in calls.read_text():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = next(a for a in calls.read_text().split() if a.startswith("checkpoint.dir="))
    assert proc.returncode != 0 and "failed: train_1b" in out, out
    assert not (tmp_path / "work").exists()
    assert not os.path.exists(os.path.dirname(ckpt.split("=", 1)[1]))
    assert "shapes_train skipped" in out and "shapes_train" not in calls.read_text()
    # the report summarises what ran (a `timeout` around the script sends this TERM)
    stages = dict(line.split("\t")[:2] for line in
                  (tmp_path / "out" / "stages.tsv").read_text().splitlines())
    assert stages["report"] == "0" and "gpu_check.py report" in calls.read_text(), out


@pytest.mark.slow
def test_a_machine_with_python3_alone_runs_the_stages(tmp_path):
    """Without a venv or PYTHON the stages ran `python`, which a bare Ubuntu image (the GPU
    machines') lacks: every stage failed with rc 127."""
    repo, stub = _checkout(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(stub, bin_dir / "python3")
    env = dict(os.environ, CALLS=str(tmp_path / "calls"), GPU_CHECK_WORK=str(tmp_path / "work"),
               PATH=f"{bin_dir}:/usr/bin:/bin")
    for name in ("OUT", "BDT_BENCH_RESULTS", "GPU_CHECK_KEEP", "BDT_WHEELS", "PYTHON"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--cpu-rehearsal",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check.py report" in (tmp_path / "calls").read_text()


@pytest.mark.slow
def test_failed_environment_check_leaves_no_scratch(tmp_path):
    """The likeliest failure on a bare box (a missing package) exited before the cleanup at the
    end: the scratch folder (with any wheels installed there) and a /dev/shm folder stayed."""
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = _run(tmp_path, ENV_FAILS="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "lacks what the check needs" in out, out
    assert not (tmp_path / "work").exists()
    if shm:
        assert not [n for n in set(os.listdir("/dev/shm")) - shm if n.startswith("bdt-gpu-check")]


@pytest.mark.slow
def test_out_is_the_callers_path_and_must_be_writable(tmp_path):
    """A relative OUT went into the checkout, not the caller's folder; one that could not be made
    (a read-only checkout) left OUT empty, and the logs went to /env.log, /stages.tsv."""
    repo, stub = _checkout(tmp_path)
    caller = tmp_path / "caller"
    caller.mkdir()
    env = dict(os.environ, PYTHON=str(stub), CALLS=str(tmp_path / "calls"),
               GPU_CHECK_WORK="work")
    for name in ("OUT", "BDT_BENCH_RESULTS", "GPU_CHECK_KEEP", "BDT_WHEELS"):
        env.pop(name, None)
    script = [str(repo / "scripts" / "gpu_check.sh"), "--cpu-rehearsal"]
    done = subprocess.run([*script, "out"], cwd=caller, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (caller / "out" / "stages.tsv").exists() and not (repo / "out").exists()
    assert not (caller / "work").exists() and not (repo / "work").exists()  # scratch went
    (caller / "file").write_text("")
    os.remove(tmp_path / "calls")
    done = subprocess.run([*script, "file/out"], cwd=caller, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "cannot write logs into file/out" in done.stdout
    (caller / "wheels").mkdir()
    done = subprocess.run([*script, "out"], cwd=caller, env=dict(env, BDT_WHEELS="wheels"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "BDT_WHEELS=wheels: no .whl files there" in done.stdout
    assert not (tmp_path / "calls").exists()  # no stage ran


@pytest.mark.parametrize("named", ["", "none"])
def test_bdt_wheels_none_leaves_the_checkouts_wheels_alone(tmp_path, named):
    """A checkout's ./wheels, made for a GPU box's Python, was installed on every run: on the
    machine that made it (another Python) its pip install failed, and so did `make test` there.
    BDT_WHEELS=none installs none."""
    repo, _ = _checkout(tmp_path)
    (repo / "wheels").mkdir()
    (repo / "wheels" / "bogus-1.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_text("")
    shutil.copy(REPO / "scripts" / "offline_wheels.py", repo / "scripts")
    env = {"BDT_WHEELS": named} if named else {}
    proc = subprocess.Popen(["bash", "-c", f'cd {repo} && exec bash scripts/gpu_check.sh '
                             f'--cpu-rehearsal {tmp_path / "out"}'],
                            env=_run_env(tmp_path, **env), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out, _ = proc.communicate(timeout=60)
    installs = [c for c in (tmp_path / "calls").read_text().splitlines() if "offline_wheels" in c]
    assert (installs == []) == (named == "none"), out
    assert proc.returncode == 0, out


@pytest.mark.slow
def test_the_train_stages_take_the_token_folders_the_tokens_stage_writes(tmp_path, monkeypatch):
    """bench/gpu_data.py writes token shards without index.json (it calls the extraction worker,
    not the job), and a stage naming a family there is refused at start: the configs' stages
    name "32" and "64", so the train stages failed at once (the rehearsal: rc 2, three stages)."""
    proc = _run(tmp_path)
    proc.communicate(timeout=60)
    tokens = tmp_path / "work" / "data" / "tokens"
    for family in ("32", "64"):  # what the tokens stage leaves: a folder per family
        (tokens / family).mkdir(parents=True)
        (tokens / family / "000000.tar").write_bytes(b"")
    calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines()
             if "bdt/train.py" in line]
    assert len(calls) == 2
    monkeypatch.chdir(REPO)  # the configs' paths
    from bdt.data.shard_source import list_shards
    from bdt.train import load_config

    read = []
    for call in calls:
        for stage in load_config(call[call.index("bdt/train.py") + 1:]).stages:
            read.append([os.path.relpath(u, tokens) for u in
                         list_shards(stage.shards, stage.family).urls])
    assert read == [["64/000000.tar"], ["32/000000.tar"], ["64/000000.tar"]]
