"""Fault drills on real 2-rank training runs (tiny model, gloo): damaged checkpoints of every file
type are reported and passed over for the newest one that verifies, and the run then ends with
the uninterrupted run's parameters; a planted pickle is refused, not run; the logged LR is the one
each step applied; a second launcher on a held run directory fails at once, naming the holder;
killing the `deepspeed` launcher leaves no rank running."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from bdt.training.distributed import free_port
from bdt.training.schedule import WarmupSchedule
from testkit import REPO, TINY_CONFIG, PlantedPickle, cut_file, flip_bytes
from trainutil import (_rank_main, export_tensors, read_metrics, rank_entry, spawn_ranks,
                       spawn_train, tiny_llm, train_overrides, write_shards)

pytestmark = pytest.mark.slow

STEPS = 13
LR, WARMUP = 3e-3, 2  # trainutil.train_overrides' stage
MODEL, OPTIM = "model/mp_rank_00_model_states.pt", "model/zero_pp_rank_{}_mp_rank_00_optim_states.pt"
# step -> (file, damage); step 1 stays intact, so the resume must fall back to it
DAMAGE = {13: ("COMPLETE", cut_file), 11: (MODEL, flip_bytes), 10: (MODEL, cut_file),
          9: (OPTIM.format(0), flip_bytes), 8: (OPTIM.format(1), cut_file),
          7: ("rank_00001.safetensors", flip_bytes), 6: ("rank_00000.safetensors", cut_file),
          5: ("rank_00000.json", flip_bytes), 4: ("rank_00001.json", cut_file),
          3: ("shared.pt", flip_bytes), 2: ("shared.pt", cut_file)}
PLANTED = 12  # OPTIM of rank 1 replaced by a pickle that would create a file, marker fixed


def _plant(ck, target):
    path = ck / OPTIM.format(1)
    torch.save({"optimizer_state_dict": PlantedPickle(str(target))}, path)
    marker = json.loads((ck / "COMPLETE").read_text())
    marker["files"][OPTIM.format(1)] = {"bytes": path.stat().st_size,
                                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (ck / "COMPLETE").write_text(json.dumps(marker))


def test_damaged_checkpoints_are_passed_over_and_the_run_ends_as_uninterrupted(tmp_path, capfd):
    llm = tiny_llm(str(tmp_path / "llm"))
    shards = os.path.dirname(write_shards(str(tmp_path / "s"), [(4, 4), (4, 8), (8, 4)],
                                          num_shards=2, per_shard=10)[0])
    run = tmp_path / "run"
    argv = ["--config", TINY_CONFIG, *train_overrides(str(run), llm, shards, steps=STEPS, every=1,
                                                  extra=["checkpoint.keep_last=0", "ema_decay=0.9"])]
    assert spawn_train(argv) == 0  # uninterrupted, a checkpoint after every step
    reference, params = read_metrics(str(run)), export_tensors(str(run))
    schedule = WarmupSchedule(WARMUP, STEPS, "cosine", 0.1)
    assert [reference[s]["lr"] for s in range(1, STEPS + 1)] == [
        LR * schedule(s - 1) for s in range(1, STEPS + 1)]  # the LR each step applied
    ck = run / "checkpoints"
    target = tmp_path / "pwned"
    for step, (name, damage) in DAMAGE.items():
        damage(ck / f"step_{step:09d}" / name)
    _plant(ck / f"step_{PLANTED:09d}", target)
    capfd.readouterr()

    assert spawn_train(argv) == 0
    out = capfd.readouterr().err  # the ranks' log
    assert not target.exists()  # refused, not run
    skipped = dict(re.findall(r"checkpoint skipped: \S+/(step_\d{9}): (.*)", out))
    assert sorted(skipped) == [f"step_{s:09d}" for s in range(2, STEPS + 1)], out[-3000:]
    for step, (name, _) in DAMAGE.items():
        assert skipped[f"step_{step:09d}"].startswith(name if name != "COMPLETE" else
                                                      "its COMPLETE marker cannot be read")
    assert "io.open" in skipped[f"step_{PLANTED:09d}"]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    resumed = [r for r in records if "resumed_from_step" in r]
    assert [(r["resumed_from_step"], r["checkpoints_skipped"]) for r in resumed] == [(1, STEPS - 1)]
    got = read_metrics(str(run))
    for step in range(2, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == reference[step][key], (step, key)
    final = export_tensors(str(run))
    assert final.keys() == params.keys() and all(torch.equal(final[k], params[k]) for k in params)
    # nothing was deleted: each damaged checkpoint was moved aside when its step was saved again
    moved = sorted(p.name for p in (ck / "unusable").glob("*/step_*"))
    assert moved == [f"step_{s:09d}" for s in range(2, STEPS + 1)]


def _descendants(root_pid, word):
    out = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if word in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def test_second_launcher_fails_fast_and_a_killed_launcher_leaves_no_rank(tmp_path):
    llm = tiny_llm(str(tmp_path / "llm"))
    shards = os.path.dirname(write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2,
                                          per_shard=6)[0])
    run = tmp_path / "run"
    args = ["--config", TINY_CONFIG, *train_overrides(str(run), llm, shards, steps=100000, every=0,
                                                  extra=["export=false"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}:"
                                                      f"{os.environ['PATH']}")
    log = open(tmp_path / "deepspeed.log", "wb")
    launcher = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                                 os.path.join(REPO, "bdt", "train.py"), *args], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    ranks, node_launcher = [], []
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() or "loss" not in (run / "metrics.jsonl").read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "deepspeed.log").read_text()[-3000:]
            time.sleep(0.5)
        ranks = _descendants(launcher.pid, "train.py --local_rank")
        node_launcher = _descendants(launcher.pid, "deepspeed.launcher.launch")
        rank0 = next(p for p in ranks if p.environ()["RANK"] == "0")
        assert len(ranks) == 2 and len(node_launcher) == 1
        # A second job on the same run directory (a plain process here) fails at once.
        second = subprocess.run([sys.executable, os.path.join(REPO, "bdt", "train.py"), *args],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by pid {rank0.pid} on " in second.stderr
        assert "loss=" not in second.stderr and not (run / "checkpoints" / "unusable").exists()
        # SIGKILL of the `deepspeed` command alone: the per-node launcher it started and the
        # ranks would run on; the ranks see it go, save, exit, and release the run lock.
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(ranks + node_launcher, timeout=120)
        assert not alive, [p.pid for p in alive]
    finally:
        for proc in ranks + node_launcher:
            if proc.is_running():
                proc.kill()
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    assert "exits with return code" not in (tmp_path / "deepspeed.log").read_text()  # all 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] and (run / "checkpoints" / f"step_{summary['step']:09d}" /
                                   "COMPLETE").exists()
    assert not (run / "RUN_LOCK").exists()


@rank_entry
def _rank_with_short_read_pauses(rank: int, world: int, port: int, argv: list[str]) -> None:
    """A rank whose tar reads retry after 0.1 s instead of 1 to 8 s (~15 s): the endpoint
    stays dead past every try either way."""
    from bdt.data import tar_reads

    tar_reads.READ_RETRY_PAUSES = (0.1,) * len(tar_reads.READ_RETRY_PAUSES)
    _rank_main(rank, world, port, argv)


def _train_one_rank_with_short_read_pauses(argv: list[str]) -> int:
    import torch.multiprocessing as mp

    try:
        spawn_ranks(_rank_with_short_read_pauses, (1, free_port(), argv), 1)
    except mp.ProcessExitedException as e:
        return e.exit_code
    return 0


def test_a_dying_s3_endpoint_ends_the_run_in_one_line_that_a_restart_may_fix(tmp_path, capfd,
                                                                             s3_stoppable):
    """The S3 endpoint of a run's shards and checkpoints dies mid-run. Before: the trainer ended
    with a long botocore traceback, and a restart meeting it before its first step recorded no
    launch error. Now each ends with one line naming the object and the endpoint (exit 2): the
    resume wrapper restarts both (a connection error is no configuration error), and once the
    store is back every checkpoint with a marker has all its files and the run resumes."""
    import threading

    from bdt import storage
    from bdt.cluster.launch_checks import retry_may_fix
    from bdt.training.checkpoint_store import list_checkpoints
    from bdt.training.integrity import read_marker

    llm = tiny_llm(str(tmp_path / "llm"))
    for local in write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2, per_shard=6):
        storage.filesystem(s3_stoppable.bucket)[0].put_file(
            local, f"{s3_stoppable.bucket}/sh/{os.path.basename(local)}")
    run, root = tmp_path / "run", f"{s3_stoppable.bucket}/ck"

    def argv(steps):
        return ["--config", TINY_CONFIG, *train_overrides(
            str(run), llm, f"{s3_stoppable.bucket}/sh", steps=steps, every=2,
            extra=[f"checkpoint.dir={root}",
                   f"checkpoint.staging_dir={tmp_path / 'staging'}"])]

    def stop_after_step_3():
        while "\"step\": 3" not in ((run / "metrics.jsonl").read_text()
                                    if (run / "metrics.jsonl").exists() else ""):
            time.sleep(0.1)
        s3_stoppable.stop()

    threading.Thread(target=stop_after_step_3, daemon=True).start()
    for attempt in ("mid-run", "restart"):
        capfd.readouterr()
        assert _train_one_rank_with_short_read_pauses(argv(1000)) == 2, attempt
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err and len(errors) == 1, (attempt, err[-3000:])
        assert re.search(rf"{s3_stoppable.bucket}\S*: .*EndpointConnectionError: .*"
                         rf"127\.0\.0\.1:{s3_stoppable.port}", errors[0]), errors[0]
    assert retry_may_fix(json.loads((run / "launch_error.json").read_text()))
    s3_stoppable.start()
    complete = [tag for _, tag, done in list_checkpoints(root) if done]
    assert complete
    fs, path = storage.filesystem(root)
    for tag in complete:
        files = read_marker(storage.join(root, tag))["files"]
        assert set(files) <= {p[len(f"{path}/{tag}/"):] for p in fs.find(f"{path}/{tag}")}, tag
    newest = int(complete[-1].split("_")[1])
    assert spawn_train(argv(newest + 1), world=1) == 0
    resumed = [json.loads(line)["resumed_from_step"] for line in open(run / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert resumed == [newest]
