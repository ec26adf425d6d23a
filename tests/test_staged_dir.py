"""bdt.storage.staged_dir: a directory a command writes appears whole or not at all, a non-empty
one is refused unless overwriting, and overwriting replaces only the entries written."""

import pytest

from bdt import storage


def _write(folder, files: dict) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.tmp").mkdir()
    (tmp_path / "out.tmp" / "stale").write_text("a killed attempt's")
    with storage.staged_dir(str(out)) as tmp:
        assert sorted(p.name for p in (tmp_path / "out.tmp").iterdir()) == []  # emptied
        _write(tmp_path / "out.tmp", {"a.txt": "1", "sub/b.txt": "2"})
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1" and (out / "sub" / "b.txt").read_text() == "2"
    assert not (tmp_path / "out.tmp").exists()


def test_a_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with storage.staged_dir(str(out)) as tmp:
            _write(tmp_path / "out.tmp", {"a.txt": "1"})
            raise RuntimeError("killed")
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    out.mkdir()  # an empty directory is taken, and stays if the block fails
    with pytest.raises(RuntimeError):
        with storage.staged_dir(str(out)):
            raise RuntimeError("killed")
    assert out.is_dir() and not list(out.iterdir())
    with storage.staged_dir(str(out)) as tmp:
        _write(tmp_path / "out.tmp", {"a.txt": "1"})
    assert (out / "a.txt").read_text() == "1"


def test_a_non_empty_directory_is_refused_unless_overwriting(tmp_path):
    out = tmp_path / "out"
    _write(out, {"keep.txt": "mine", "a.txt": "old", "was_dir/x": "old", "was_file": "old"})
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        with storage.staged_dir(str(out)):
            pytest.fail("the block must not run")
    with pytest.raises(FileExistsError, match="is not empty: do this"):
        storage.refuse_nonempty_dir(str(out), "do this")
    with storage.staged_dir(str(out), overwrite=True) as tmp:
        _write(tmp_path / "out.tmp", {"a.txt": "new", "was_dir": "now a file",
                                      "was_file/y": "now a dir"})
    assert (out / "keep.txt").read_text() == "mine" and (out / "a.txt").read_text() == "new"
    assert (out / "was_dir").read_text() == "now a file"
    assert (out / "was_file" / "y").read_text() == "now a dir"
    assert not (tmp_path / "out.tmp").exists()


def test_a_file_or_a_remote_url_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not a directory"):
            with storage.staged_dir(str(tmp_path / "file"), overwrite=overwrite):
                pass
    with pytest.raises(ValueError, match="written locally"):
        with storage.staged_dir("s3://bucket/out"):
            pass


def test_a_link_to_an_empty_directory_gets_the_files(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with storage.staged_dir(str(tmp_path / "link")) as tmp:
        _write(tmp_path / "real.tmp", {"a.txt": "1"})
        assert tmp == str(tmp_path / "real.tmp")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "a.txt").read_text() == "1"
