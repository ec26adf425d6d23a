"""A data source that lists no shards at start: on a remote store (s3://, any fsspec URL) a
listing may briefly come back short, so the resume wrapper restarts the job; a local path
without shards stays an error no restart fixes (bdt.data.shard_source.EmptyRemoteListing,
bdt.cluster.launch_checks.retry_may_fix)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest

from bdt.cluster.launch_checks import retry_may_fix
from bdt.cluster.resume import CANNOT_START, DONE
from bdt.data.shard_source import EmptyRemoteListing, list_shards
from bdt.training.ar.start_checks import check_data
from bdt.training.run_dir import LAUNCH_ERROR, record_launch_error

REPO = Path(__file__).resolve().parents[2]
BUCKET = "memory://bdt-empty-listing"


@pytest.fixture
def remote_folder():
    """A remote folder holding a file but no shard; removed after the test."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bdt-empty-listing/tokens/notes.txt", b"not a shard")
    yield f"{BUCKET}/tokens"
    fs.rm("/bdt-empty-listing", recursive=True)


def _recorded(tmp_path, source: str) -> tuple[dict, BaseException]:
    """What the AR trainer records when its stage names `source` (start_checks.check_data)."""
    cfg = SimpleNamespace(data=SimpleNamespace(tokenizer=""), stages=[SimpleNamespace(
        name="s0", shards=source, family="", allow_incomplete=False)])
    with pytest.raises(ValueError) as raised:
        check_data(cfg)
    record_launch_error(str(tmp_path), raised.value)
    return json.loads((tmp_path / LAUNCH_ERROR).read_text()), raised.value


@pytest.mark.parametrize("where, named", [
    ("{remote}/*.tar", "matches no file"),
    ("{remote}", "holds no .tar files and no index.json"),
    ("{remote}/not-written-yet", "does not exist"),
])
def test_a_remote_source_that_lists_no_shards_is_retried(tmp_path, remote_folder, where, named):
    source = where.format(remote=remote_folder)
    with pytest.raises(EmptyRemoteListing, match=named):
        list_shards(source)
    record, error = _recorded(tmp_path, source)
    assert record["message"] == str(error)
    assert record["message"].startswith("stages[0] (s0): shards: ") and source in str(error)
    assert retry_may_fix(record)


@pytest.mark.parametrize("where, named", [
    ("{local}/*.tar", "matches no file"),
    ("{local}", "holds no .tar files and no index.json"),
    ("{local}/missing", "does not exist"),
    ("{remote}/missing.tar", "does not exist"),  # one named object, not a listing
])
def test_a_local_source_without_shards_cannot_start(tmp_path, remote_folder, where, named):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "notes.txt").write_text("not a shard")
    source = where.format(local=tmp_path / "local", remote=remote_folder)
    with pytest.raises(ValueError, match=named) as raised:
        list_shards(source)
    assert not isinstance(raised.value, EmptyRemoteListing)
    record, _ = _recorded(tmp_path, source)
    assert named in record["message"] and not retry_may_fix(record)


def _wrap(tmp_path, source: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The resume wrapper around a command that fails at start as the trainer does when
    `source` lists no shards, and finishes on its second launch."""
    count = tmp_path / "launches"
    script = (f"import json, pathlib, sys\n"
              f"from bdt.data.shard_source import list_shards\n"
              f"from bdt.training.run_dir import record_launch_error\n"
              f"c = pathlib.Path({str(count)!r}); c.write_text(c.read_text() + 'x' "
              f"if c.exists() else 'x')\n"
              f"if len(c.read_text()) == 1:\n"
              f"    try:\n        list_shards({source!r})\n"
              f"    except ValueError as e:\n"
              f"        record_launch_error({str(tmp_path)!r}, e); sys.exit(1)\n"
              f"pathlib.Path({str(tmp_path / 'summary.json')!r}).write_text("
              f"json.dumps({{'stopped': False}}))\n")
    out = subprocess.run([sys.executable, "-m", "bdt.cluster.resume", "--run-dir", str(tmp_path),
                          "--max-restarts", "2", "--backoff", "0", "--", sys.executable, "-c",
                          script], cwd=REPO, capture_output=True, text=True, timeout=300)
    events = [json.loads(line)["event"] for line in
              (tmp_path / "resume.jsonl").read_text().splitlines()]
    return out, events


@pytest.mark.slow
def test_the_wrapper_restarts_an_empty_remote_listing_and_stops_on_a_local_one(tmp_path):
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    out, events = _wrap(remote, f"{BUCKET}/never-written/*.tar")  # memory://: this launch's own
    assert out.returncode == DONE, out.stderr[-3000:]
    assert events == ["launch", "restart", "launch", "done"]
    assert "matches no file" in out.stderr
    out, events = _wrap(local, f"{local}/*.tar")
    assert out.returncode == CANNOT_START, out.stderr[-3000:]
    assert events == ["launch", "cannot_start"] and "matches no file" in out.stderr


@pytest.mark.slow
def test_an_empty_s3_listing_is_retried(tmp_path, s3_bucket):
    source = f"{s3_bucket}/tokens/*.tar"
    with pytest.raises(EmptyRemoteListing, match="matches no file"):
        list_shards(source)
    assert retry_may_fix(_recorded(tmp_path, source)[0])
