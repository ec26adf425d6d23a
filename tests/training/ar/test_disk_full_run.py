"""The AR trainer on a full disk (a plain `python bdt/train.py` process, a world of one, its
writes past RLIMIT_FSIZE failing with EFBIG as ENOSPC fails them on a full volume). A failed
checkpoint save ended in a traceback of torch's "basic_ios::clear: iostream error", a failed
export in the Rust tokenizer's bare Exception; now each ends with one line naming what was
being written and the OS error. The older checkpoint stays complete, the run lock is released,
and a rerun with room resumes from it; a failed export leaves no half-written copy. For an
s3:// root, the error names the local staging folder that filled, and the staged part goes:
it stayed in the node's temp dir, which a save's staging had just filled."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from testkit import REPO, TINY_CONFIG
from trainutil import tiny_llm, train_overrides, write_shards

pytestmark = pytest.mark.slow


def _train(overrides: list[str], max_file_bytes: int | None = None,
           **env_vars: str) -> subprocess.CompletedProcess:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), **env_vars)
    return subprocess.run([sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config",
                           TINY_CONFIG, *overrides], env=env, capture_output=True, text=True,
                          timeout=240, preexec_fn=limit if max_file_bytes else None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inputs")
    shards = os.path.dirname(write_shards(str(tmp / "s"), [(4, 4), (4, 8)], num_shards=1,
                                          per_shard=8)[0])
    return tiny_llm(str(tmp / "llm")), shards


def test_a_failed_save_names_the_checkpoint_and_keeps_the_one_before(tmp_path, inputs):
    llm, shards = inputs
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = lambda steps: train_overrides(str(run), llm, shards, steps=steps, every=2,  # noqa: E731
                                         extra=["export=false"])
    first = _train(args(2))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in (ckpts / "step_000000002").rglob("*") if p.is_file()}

    full = _train(args(4), max_file_bytes=256 * 1024)  # the engine's files are larger
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.rstrip().splitlines()[-1] == \
        f"error: saving checkpoint {ckpts / 'step_000000004'}: [Errno 27] File too large"
    assert {p: p.read_bytes() for p in (ckpts / "step_000000002").rglob("*") if p.is_file()} == before
    assert not (ckpts / "step_000000004" / "COMPLETE").exists()
    assert not (run / "RUN_LOCK").exists()

    again = _train(args(4))
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the failed run had resumed from step 2 too
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [2, 2]
    assert (ckpts / "step_000000004" / "COMPLETE").exists()


def test_a_failed_export_names_it_and_leaves_no_partial_copy(tmp_path, inputs):
    llm, shards = inputs
    run = tmp_path / "run"
    # No checkpoint: the export's weights (over 128 KiB) are the first file past the limit.
    full = _train(train_overrides(str(run), llm, shards, steps=1, every=0,
                                  extra=["checkpoint.at_end=false"]), max_file_bytes=128 * 1024)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.rstrip().splitlines()[-1] == \
        f"error: exporting the model to {run / 'export'}: [Errno 27] File too large"
    assert not (run / "export").exists() and not (run / "export.tmp").exists()
    assert not (run / "RUN_LOCK").exists()


def test_a_full_staging_dir_is_named_and_emptied_for_an_s3_root(tmp_path, inputs, s3_bucket):
    llm, shards = inputs
    temp = tmp_path / "temp"
    temp.mkdir()
    full = _train(train_overrides(str(tmp_path / "run"), llm, shards, steps=2, every=2,
                                  extra=["export=false", f"checkpoint.dir={s3_bucket}/ck"]),
                  max_file_bytes=256 * 1024, TMPDIR=str(temp))
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    staging = next((temp / "bdt-ckpt-staging").iterdir(), None)
    assert staging is None or not any(staging.iterdir()), list(staging.rglob("*"))
    line = full.stderr.rstrip().splitlines()[-1]
    assert line.startswith(f"error: saving checkpoint {s3_bucket}/ck/step_000000002: staging it "
                           f"in {temp / 'bdt-ckpt-staging'}/"), line
    assert line.endswith("/step_000000002: [Errno 27] File too large"), line
