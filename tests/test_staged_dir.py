"""bdt.output_dirs.staged_dir: a directory a command writes appears whole or not at all, a non-empty
one is refused unless overwriting, and overwriting replaces only the entries written."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bdt import output_dirs, storage


def _write(folder, files: dict) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


STAGING = ".out.bdt-staging"  # beside a new `out` (an earlier bdt's name: no writer tag)


def _staging(folder, prefix=STAGING) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix))


def test_the_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    (tmp_path / STAGING).mkdir()
    (tmp_path / STAGING / "stale").write_text("a killed attempt's")
    with output_dirs.staged_dir(str(out)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert _staging(tmp_path) == [os.path.basename(tmp)]  # the stale one went
        assert os.listdir(tmp) == []
        _write(Path(tmp), {"a.txt": "1", "sub/b.txt": "2"})
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1" and (out / "sub" / "b.txt").read_text() == "2"
    assert _staging(tmp_path) == []


def test_a_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_dirs.staged_dir(str(out)) as tmp:
            _write(Path(tmp), {"a.txt": "1"})
            raise RuntimeError("killed")
    assert not out.exists() and _staging(tmp_path) == []
    out.mkdir()  # an empty directory is taken, and stays if the block fails
    with pytest.raises(RuntimeError):
        with output_dirs.staged_dir(str(out)):
            raise RuntimeError("killed")
    assert out.is_dir() and not list(out.iterdir())
    with output_dirs.staged_dir(str(out)) as tmp:
        _write(Path(tmp), {"a.txt": "1"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]


def test_a_non_empty_directory_is_refused_unless_overwriting(tmp_path):
    out = tmp_path / "out"
    _write(out, {"keep.txt": "mine", "a.txt": "old", "was_dir/x": "old", "was_file": "old"})
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        with output_dirs.staged_dir(str(out)):
            pytest.fail("the block must not run")
    with pytest.raises(FileExistsError, match="is not empty: do this"):
        output_dirs.refuse_nonempty_dir(str(out), "do this")
    with output_dirs.staged_dir(str(out), overwrite=True) as tmp:
        _write(Path(tmp), {"a.txt": "new", "was_dir": "now a file", "was_file/y": "now a dir"})
    assert (out / "keep.txt").read_text() == "mine" and (out / "a.txt").read_text() == "new"
    assert (out / "was_dir").read_text() == "now a file"
    assert (out / "was_file" / "y").read_text() == "now a dir"
    assert _staging(out, output_dirs.STAGING_NAME) == []


def test_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not a directory"):
            with output_dirs.staged_dir(str(tmp_path / "file"), overwrite=overwrite):
                pass


@pytest.mark.slow
def test_a_remote_directory_is_uploaded_when_complete(s3_bucket):
    """On an object store: nothing uploaded when the block fails, the contents (nested too)
    once it ends; then a non-empty prefix is refused unless overwrite, and a missing bucket
    before any work."""
    fs, _ = storage.filesystem(s3_bucket)
    out = s3_bucket + "/runs/out"
    with pytest.raises(RuntimeError):
        with output_dirs.staged_dir(out) as tmp:
            _write(Path(tmp), {"a.txt": "1"})
            raise RuntimeError("the work failed")
    assert not fs.exists(out)
    with output_dirs.staged_dir(out) as tmp:
        _write(Path(tmp), {"a.txt": "1", "sub/b.txt": "2"})
    assert fs.cat(out + "/a.txt") == b"1" and fs.cat(out + "/sub/b.txt") == b"2"
    assert not os.path.exists(tmp)  # the local staging folder is gone
    with pytest.raises(FileExistsError, match="is not empty: do this"):
        output_dirs.refuse_nonempty_dir(out, "do this")
    with output_dirs.staged_dir(out, overwrite=True) as tmp:
        _write(Path(tmp), {"a.txt": "new"})
    assert fs.cat(out + "/a.txt") == b"new" and fs.cat(out + "/sub/b.txt") == b"2"
    with pytest.raises(FileExistsError, match="is not a directory"):
        output_dirs.refuse_nonempty_dir(out + "/a.txt", overwrite=True)
    with pytest.raises(OSError, match="bucket 'no-such-bucket-bdt' does not exist"):
        output_dirs.refuse_nonempty_dir("s3://no-such-bucket-bdt/out")


_KILLED_REMOTE_WRITER = """
import os, signal, sys
from bdt import output_dirs
with output_dirs.staged_dir(sys.argv[1]) as tmp:
    open(os.path.join(tmp, "0000.png"), "wb").write(b"x" * 1000)
    print(os.path.basename(tmp), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_remote_writers_staging_folder_goes_with_the_next_remote_write(
        tmp_path, monkeypatch, s3_bucket):
    """A SIGKILLed `bdt sample --out s3://...` left its staging folder (its images) in the
    system temp dir for good. The next remote write removes it; a live writer's, another
    host's, an untagged one (an older bdt's, or not bdt's), a link and a file stay."""
    from bdt.processes import host_tag, writer_tag

    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _KILLED_REMOTE_WRITER, s3_bucket + "/out"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = tmp_path / proc.stdout.strip()
    assert (dead / "0000.png").is_file() and dead.name.startswith("bdt-staging-")
    other_host = writer_tag()[:-8] + f"{int(host_tag(), 16) ^ 1:08x}"
    kept = [f"bdt-staging-{writer_tag()}-live", f"bdt-staging-{other_host}-theirs",
            "bdt-staging-k2j3h4_x", "bdt-staging-1-2-nothex!-x"]
    for name in kept:
        _write(tmp_path / name, {"a.png": "keep"})
    target = tmp_path / "elsewhere"
    _write(target, {"a.png": "keep"})
    link, file = tmp_path / (dead.name + "l"), tmp_path / (dead.name + "f")  # the dead's tag
    link.symlink_to(target)
    file.write_text("keep")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with output_dirs.staged_dir(s3_bucket + "/out") as tmp:
        _write(Path(tmp), {"a.txt": "1"})
    assert not dead.exists()
    assert all((tmp_path / name / "a.png").read_text() == "keep" for name in kept)
    assert link.is_symlink() and (target / "a.png").is_file() and file.read_text() == "keep"


def test_a_link_to_an_empty_directory_gets_the_files(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with output_dirs.staged_dir(str(tmp_path / "link")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "real")
        _write(Path(tmp), {"a.txt": "1"})
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "a.txt").read_text() == "1"


@pytest.mark.parametrize("kind", ["folder", "file", "link"])
def test_a_users_out_tmp_is_never_touched(tmp_path, kind):
    """`<out>.tmp` may be anything of the user's, e.g. a link to a folder that matters."""
    _write(tmp_path, {"important/data": "precious", "out.tmp.file": "precious"})
    if kind == "folder":
        _write(tmp_path, {"out.tmp/data": "precious"})
    elif kind == "file":
        (tmp_path / "out.tmp.file").rename(tmp_path / "out.tmp")
    else:
        (tmp_path / "out.tmp").symlink_to(tmp_path / "important")
    with output_dirs.staged_dir(str(tmp_path / "out")) as tmp:
        _write(type(tmp_path)(tmp), {"a.txt": "1"})
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert (tmp_path / "important" / "data").read_text() == "precious"
    kept = tmp_path / "out.tmp" if kind == "file" else tmp_path / "out.tmp" / "data"
    assert kept.read_text() == "precious"


def test_a_link_or_file_named_as_a_staging_folder_is_neither_followed_nor_removed(tmp_path):
    _write(tmp_path, {"important/data": "precious", "out/.bdt-staging": "mine"})
    (tmp_path / STAGING).symlink_to(tmp_path / "important")
    (tmp_path / f"{STAGING}-1-2-abcdef01").symlink_to(tmp_path / "important")
    with pytest.raises(FileExistsError, match="out exists and is not empty"):  # a file of mine
        output_dirs.refuse_nonempty_dir(str(tmp_path / "out"))
    (tmp_path / "out" / ".bdt-staging").unlink()
    with output_dirs.staged_dir(str(tmp_path / "out")) as tmp:
        _write(Path(tmp), {"a.txt": "1"})
    assert (tmp_path / "important" / "data").read_text() == "precious"
    assert (tmp_path / STAGING).is_symlink() and (tmp_path / f"{STAGING}-1-2-abcdef01").is_symlink()
    assert sorted(os.listdir(tmp_path / "out")) == ["a.txt"]


def test_an_empty_path_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {"a.txt": "mine"})
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="the output directory is ''"):
            with output_dirs.staged_dir("", overwrite=overwrite):
                pytest.fail("the block must not run")
    assert (tmp_path / "a.txt").read_text() == "mine"


def test_an_existing_directory_stays_the_same_directory(tmp_path, monkeypatch):
    """`--out .` from inside an empty folder, or a folder with its own permissions (or a volume
    mounted there): filled in place, never removed and replaced by another directory."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o2770)
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    with output_dirs.staged_dir(".") as tmp:
        _write(type(tmp_path)(tmp), {"a.txt": "1"})
    assert os.getcwd() == str(out) and os.stat(".").st_ino == inode and out.stat().st_ino == inode
    assert out.stat().st_mode & 0o7777 == 0o2770
    assert sorted(os.listdir(".")) == ["a.txt"]


_KILLED_WRITER = """
import os, signal, sys
from bdt import output_dirs
with output_dirs.staged_dir(sys.argv[1]) as tmp:
    open(os.path.join(tmp, "half.bin"), "wb").write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_writer_killed_midway_leaves_nothing_and_a_rerun_succeeds(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)])
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or _staging(out, "") == _staging(out, output_dirs.STAGING_NAME)
    output_dirs.refuse_nonempty_dir(str(out))  # a staging folder left inside counts as empty
    with output_dirs.staged_dir(str(out)) as tmp:
        _write(type(tmp_path)(tmp), {"a.txt": "1"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_WAITING_WRITER = """
import os, sys
from bdt import output_dirs
with output_dirs.staged_dir(sys.argv[1], last="eval.json") as tmp:
    for name in ("a.png", "eval.json"):
        open(os.path.join(tmp, name), "w").write("first")
    print("staged", flush=True)
    sys.stdin.readline()  # until the test lets it finish
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_second_writer_is_refused_while_the_first_writes(tmp_path, existing):
    """Two `bdt eval --out X` at once both reported success: the second deleted the first's
    live staging folder at its start, and the later one replaced the other's files although
    neither passed --overwrite."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", _WAITING_WRITER, str(out)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline() == "staged\n"
        busy = rf"{out} is being written by another bdt process \(pid {first.pid}\)"
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=busy):
                output_dirs.refuse_nonempty_dir(str(out), overwrite=overwrite)
            with pytest.raises(FileExistsError, match=busy):
                with output_dirs.staged_dir(str(out), overwrite=overwrite):
                    pytest.fail("the block must not run")
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.png": "first", "eval.json": "first"}
    assert _staging(tmp_path) == []
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        with output_dirs.staged_dir(str(out)):
            pytest.fail("the block must not run")


def test_an_output_completed_after_the_check_is_not_replaced(tmp_path, monkeypatch):
    """Another writer may complete the output between this one's check and its staging folder:
    the check is made again once the folder exists."""
    out, real_tag = tmp_path / "out", output_dirs.writer_tag

    def tag_once_the_other_is_done() -> str:
        _write(out, {"eval.json": "the other's"})
        return real_tag()

    monkeypatch.setattr(output_dirs, "writer_tag", tag_once_the_other_is_done)
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        with output_dirs.staged_dir(str(out)):
            pytest.fail("the block must not run")
    assert os.listdir(out) == ["eval.json"] and _staging(tmp_path) == []


def test_another_hosts_staging_folder_is_left_to_its_writer(tmp_path):
    """This host cannot tell whether another host's writer still runs: it is not deleted, and the
    error says which folder to delete if that writer is gone."""
    from bdt.processes import host_tag

    other = tmp_path / f"{STAGING}-123-456-{int(host_tag(), 16) ^ 1:08x}"
    _write(other, {"a.png": "theirs"})
    with pytest.raises(FileExistsError, match=rf"another bdt process \(on another host\).*{other}"):
        output_dirs.refuse_nonempty_dir(str(tmp_path / "out"))
    assert (other / "a.png").read_text() == "theirs"


_KILLED_MID_MOVE = """
import os, signal, sys
from bdt import output_dirs
out, kill_at = os.path.realpath(sys.argv[1]), int(sys.argv[2])
moves, real_replace = [], os.replace
def replace(source, target):
    if os.path.dirname(target) == out:  # one entry out of the staging folder
        moves.append(target)
        if len(moves) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
os.replace = replace
with output_dirs.staged_dir(out, overwrite=True, last="report.json") as tmp:
    for name in ("a.png", "b.png", "images", "report.json"):
        open(os.path.join(tmp, name), "w").write("new")
"""


@pytest.mark.parametrize("kill_at", [2, 4])
def test_a_kill_while_entries_move_in_is_undone_by_the_next_writer(tmp_path, kill_at):
    """A kill between the renames into an existing --out left part of the output there, which a
    rerun refused as a non-empty directory, or (the report first) took as complete."""
    out = tmp_path / "out"
    _write(out, {"mine.txt": "keep"})
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_MOVE, str(out), str(kill_at)])
    assert proc.returncode == -signal.SIGKILL
    moved = set(os.listdir(out)) - {"mine.txt", *_staging(out, output_dirs.STAGING_NAME)}
    assert len(moved) == kill_at - 1 and "report.json" not in moved  # the marker moves last
    output_dirs.refuse_nonempty_dir(str(out), overwrite=True)  # the next writer takes them out
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    with output_dirs.staged_dir(str(out), overwrite=True, last="report.json") as tmp:
        _write(type(tmp_path)(tmp), {"a.png": "2", "report.json": "2"})
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "mine.txt", "report.json"]


def test_a_failed_rename_takes_back_what_moved(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_replace, moves = os.replace, []

    def replace(source, target):
        if os.path.dirname(target) == str(out):
            moves.append(target)
            if len(moves) == 2:
                raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with output_dirs.staged_dir(str(out)) as tmp:
            _write(type(tmp_path)(tmp), {"a.txt": "1", "b.txt": "2", "c.txt": "3"})
    assert list(out.iterdir()) == []


def test_a_reader_never_sees_a_missing_or_partial_file_while_it_is_rewritten(tmp_path):
    """As a sampler reading <run>/backbone/ while a restarting trainer rewrites it: every file
    is always there, whole, old or new."""
    import threading

    out, names = tmp_path / "out", ["config.json", "tokenizer.json", "tokenizer_config.json"]
    versions = {"a" * 50_000, "b" * 50_000}
    _write(out, dict.fromkeys(names, "a" * 50_000))
    done, seen = threading.Event(), []

    def read() -> None:
        while not done.is_set():
            seen.extend((out / name).read_text() for name in names)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            with output_dirs.staged_dir(str(out), overwrite=True) as tmp:
                _write(type(tmp_path)(tmp), dict.fromkeys(names, "ab"[i % 2] * 50_000))
    finally:
        done.set()
        reader.join()
    assert seen and set(seen) <= versions
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


@pytest.mark.slow
def test_a_remote_output_takes_its_completion_marker_last(s3_bucket, monkeypatch):
    """On S3, `last` (eval.json, samples.json) went up with the rest in any order, and an
    overwritten output's old marker stayed beside the new files while they were uploaded: an
    upload that failed midway left a half output that its marker passed for complete."""
    import s3fs

    out = s3_bucket + "/eval"
    with output_dirs.staged_dir(out, last="eval.json") as tmp:
        _write(Path(tmp), {"eval.json": "old", "images/a.png": "a", "z.md": "z"})
    fs, _ = storage.filesystem(s3_bucket)
    assert fs.cat(out + "/eval.json") == b"old"
    real_put_file, uploaded = s3fs.S3FileSystem._put_file, []

    async def put_file(self, lpath, rpath, **kwargs):
        uploaded.append(rpath.rsplit("/eval/", 1)[1])
        if rpath.endswith("z.md"):
            raise ConnectionError("network down")
        return await real_put_file(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put_file)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance binds its sync methods when made
    with pytest.raises(ConnectionError):
        with output_dirs.staged_dir(out, overwrite=True, last="eval.json") as tmp:
            _write(Path(tmp), {"eval.json": "new", "images/b.png": "b", "z.md": "z2"})
    assert "eval.json" not in uploaded
    fs.invalidate_cache()
    assert not fs.exists(out + "/eval.json")  # neither the old marker nor the new one
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real_put_file)
    s3fs.S3FileSystem.clear_instance_cache()
    with output_dirs.staged_dir(out, overwrite=True, last="eval.json") as tmp:
        _write(Path(tmp), {"eval.json": "new", "images/b.png": "b", "z.md": "z2"})
    fs.invalidate_cache()
    assert fs.cat(out + "/eval.json") == b"new"
    assert sorted(fs.find(out[len("s3://"):])) == [f"{out[len('s3://'):]}/{n}" for n in
                                                   ("eval.json", "images/b.png", "z.md")]


def test_files_get_the_mode_open_gives_not_safetensors_0600(tmp_path):
    """safetensors writes 0600: an export or init-tiny model was unreadable to the cluster's
    group while the config beside it was not. Files leave the staging folder as open() makes
    them under the process umask."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o027)
    try:
        with output_dirs.staged_dir(str(tmp_path / "out")) as tmp:
            save_file({"w": torch.zeros(2)}, os.path.join(tmp, "model.safetensors"))
            _write(Path(tmp), {"sub/config.json": "{}"})
    finally:
        os.umask(old)
    for name in ("model.safetensors", "sub/config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("form", ["~/out", "file://{home}/out"])
def test_an_output_named_with_tilde_or_file_url_goes_there(tmp_path, monkeypatch, form):
    """`bdt model init-tiny --out ~/m` (or `--out=~/m`, which the shell leaves alone) wrote the
    model into a folder named `~` under the working directory, and `file:///x` into `file:`."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    out = form.format(home=home)
    output_dirs.refuse_nonempty_dir(out)
    with output_dirs.staged_dir(out) as tmp:
        Path(tmp, "a.txt").write_text("a")
    assert (home / "out" / "a.txt").read_text() == "a" and os.listdir(cwd) == []
    with pytest.raises(FileExistsError, match=f"{home}/out exists and is not empty"):
        output_dirs.refuse_nonempty_dir(out)
