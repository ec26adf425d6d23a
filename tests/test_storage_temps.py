"""Temp files that killed writers leave beside a name (storage.open_atomic, create_exclusive):
they go at the next write of that name, while a live writer's temp, or another host's, stays;
and they are no part of a tokenizer's identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bdt import storage
from bdt.tokenizer.io import tokenizer_identity

_WRITER = r"""
import os, signal, sys
from bdt import storage
mode, url = sys.argv[1:3]
if mode == "kill-before-link":  # between writing the lock's temp and linking it to the name
    os.link = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    storage.create_exclusive(url, b"killed")
with storage.open_atomic(url) as f:
    f.write(b"from the child")
    f.flush()
    if mode == "kill-mid-write":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.readline()  # "wait-mid-write": finish once the parent says so
"""


def _writer(mode: str, url: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, mode, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _killed_writer_temp(mode: str, url: str) -> str:
    """Run a writer of `url` that is SIGKILLed mid-write; the one temp name it left."""
    before = set(os.listdir(os.path.dirname(url)))
    child = _writer(mode, url)
    assert child.wait(timeout=60) == -9
    left = set(os.listdir(os.path.dirname(url))) - before
    assert len(left) == 1, left
    return next(iter(left))


def test_a_killed_lock_takers_temp_goes_at_the_next_create_exclusive(tmp_path):
    lock = str(tmp_path / "lock.json")
    _killed_writer_temp("kill-before-link", lock)
    assert storage.create_exclusive(lock, b"mine")
    assert os.listdir(tmp_path) == ["lock.json"]
    assert not storage.create_exclusive(lock, b"again")
    assert (tmp_path / "lock.json").read_bytes() == b"mine"


def test_a_live_writers_temp_stays(tmp_path):
    """Two writers of one name with no lock held (`bdt data shapes` run twice): the cleanup of
    one must not delete the other's file in progress."""
    url = str(tmp_path / "shard.tar")
    live = _writer("wait-mid-write", url)
    try:
        assert live.stdout.readline() == "writing\n"
        storage.remove_stale_temps(url)
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(timeout=60) == 0  # its temp was there to rename
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "shard.tar").read_bytes() == b"from the child"
    with storage.open_atomic(url) as f:  # this process's own temp, mid-write, stays too
        storage.remove_stale_temps(url)
        f.write(b"from the parent")
    assert os.listdir(tmp_path) == ["shard.tar"]
    assert (tmp_path / "shard.tar").read_bytes() == b"from the parent"


def test_a_killed_writers_temp_goes_but_not_another_hosts_or_other_files(tmp_path):
    url = str(tmp_path / "shard.tar")
    dead = _killed_writer_temp("kill-mid-write", url)
    pid, started_ms, host, rand = dead[len(".shard.tar.tmp-"):].split("-")
    elsewhere = "0" * 8 if host != "0" * 8 else "1" * 8
    other_host = f".shard.tar.tmp-{pid}-{started_ms}-{elsewhere}-{rand}"
    kept = [other_host, ".shard.tar.tmp-notes", ".other.tar.tmp-0123abcd", "shard.tar.bak",
            ".shard.tar.tmp-0123abcd.tmp-4567cdef"]  # the last: a temp of another name
    old_style = [".shard.tar.tmp-0123abcd", "shard.tar." + "ab" * 16 + ".tmp"]  # name no writer
    for name in kept + old_style:
        (tmp_path / name).write_bytes(b"x")
    storage.remove_stale_temps(url)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_tokenizer_identity_ignores_a_killed_writers_temp_but_not_another_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"ch": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = tokenizer_identity(str(tmp_path))
    _killed_writer_temp("kill-mid-write", str(tmp_path / "model.safetensors"))
    (tmp_path / ".config.json.tmp-0123abcd").write_bytes(b"{")  # an older bdt's temp
    assert tokenizer_identity(str(tmp_path)) == before
    for extra in ("notes.txt", ".model.safetensors.tmp-backup"):
        (tmp_path / extra).write_bytes(b"x")
        assert extra in tokenizer_identity(str(tmp_path))["sha256"]
        os.remove(tmp_path / extra)


def test_a_killed_writers_temp_goes_at_the_next_write_of_its_name(tmp_path):
    """Callers once had to remove stale temps themselves, and those that did not (the AR run's
    summary.json and config.yaml, `bdt tokenizer encode`) kept a killed write's temp forever."""
    url = str(tmp_path / "summary.json")
    _killed_writer_temp("kill-mid-write", url)
    storage.write_bytes_atomic(url, b"{}")
    assert os.listdir(tmp_path) == ["summary.json"]


_KILLED_ENCODE = """
import os, signal, sys
import numpy
numpy.save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # mid-write of the .npy
from bdt import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_rerun_of_a_killed_tokenizer_encode_leaves_only_its_output(tmp_path):
    from PIL import Image

    from testkit import save_tiny_image_tokenizer

    save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    args = ["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "--images",
            str(tmp_path / "red.png"), "--out", str(tmp_path / "out" / "bits.npy")]
    killed = subprocess.run([sys.executable, "-c", _KILLED_ENCODE, *args],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert killed.returncode == -9 and len(os.listdir(tmp_path / "out")) == 1  # its temp
    from bdt import cli

    assert cli.main(args) == 0
    assert os.listdir(tmp_path / "out") == ["bits.npy"]
