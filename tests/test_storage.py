"""Storage helpers: a file is either complete or absent, locally and on S3."""

from __future__ import annotations

import os

import pytest

from bdt import storage


@pytest.mark.slow
def test_failed_remote_write_leaves_no_object(s3_bucket):
    url = s3_bucket + "/partial.bin"
    with pytest.raises(RuntimeError):
        with storage.open_atomic(url) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"done")
    assert storage.read_bytes(url) == b"done"


def test_failed_local_write_leaves_nothing(tmp_path):
    url = str(tmp_path / "out" / "partial.bin")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(url) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path / "out") == []


def test_check_writable_names_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=str(blocker)):
        storage.check_writable(str(blocker / "sub"))
    storage.check_writable(str(tmp_path / "ok"))
    assert os.listdir(tmp_path / "ok") == []
