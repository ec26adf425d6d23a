"""Storage helpers: a file is either complete or absent, locally and on S3."""

from __future__ import annotations

import os
import re

import pytest

from bdt import output_dirs, storage, url_listing


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


@pytest.mark.slow
def test_a_mistyped_bucket_is_refused_not_created(s3_bucket):
    """fsspec.open makes missing parents, and for s3fs a parent is a bucket: check_writable once
    passed by creating the bucket a typo named."""
    fs, _ = storage.filesystem(s3_bucket)
    typo = s3_bucket + "-typo"
    with pytest.raises(OSError, match=f"cannot write to {typo}/out"):
        storage.check_writable(typo + "/out")
    with pytest.raises(OSError, match=f"cannot write {typo}/x.bin"):
        storage.write_bytes_atomic(typo + "/x.bin", b"x")
    fs.invalidate_cache()
    assert not fs.exists(typo[len("s3://"):])


@pytest.mark.slow
def test_remote_staged_dir_replaces_entries_whole_and_sees_other_writers(s3_bucket):
    """--overwrite on S3 once merged an old report's images/ with the new one's; and a file
    another process wrote after this one listed the prefix stayed invisible to it (s3fs caches
    listings without expiry)."""
    out = s3_bucket + "/report"
    for names in (["images/old.png", "images/older.png", "eval.json"], ["images/new.png"]):
        with output_dirs.staged_dir(out, overwrite=True) as tmp:
            for name in names:
                os.makedirs(os.path.dirname(os.path.join(tmp, name)) or tmp, exist_ok=True)
                open(os.path.join(tmp, name), "w").write(name)
    assert url_listing.expand_urls(out + "/images/*.png", "x") == [out + "/images/new.png"]
    assert storage.exists(out + "/eval.json")  # an entry the new output has not: kept, as locally
    import s3fs

    other = s3fs.S3FileSystem(client_kwargs=storage.filesystem(s3_bucket)[0].client_kwargs,
                              skip_instance_cache=True)
    other.pipe_file(out[len("s3://"):] + "/images/late.png", b"late")
    assert storage.exists(out + "/images/late.png")
    assert storage.read_bytes(out + "/images/late.png") == b"late"
    assert len(url_listing.expand_urls(out + "/images/*.png", "x")) == 2


def test_expand_urls_splits_only_at_commas_outside_braces():
    """`in-{000000,000002}.tar` was cut at its comma before brace expansion: unbalanced braces."""
    assert url_listing.expand_urls("d/in-{000000,000002}.tar, e/{a,{b,c}}.tar,f.tar,", "x") == [
        "d/in-000000.tar", "d/in-000002.tar", "e/a.tar", "e/b.tar", "e/c.tar", "f.tar"]


def test_expand_urls_keeps_an_existing_name_whose_glob_characters_are_literal(tmp_path):
    """`img[1].tar` given by name was taken for a glob matching nothing and silently dropped."""
    for name in ("img[1].tar", "b.tar"):
        (tmp_path / name).write_bytes(b"x")
    spec = f"{tmp_path}/img[1].tar,{tmp_path}/b.tar"
    assert url_listing.expand_urls(spec, "x") == [f"{tmp_path}/img[1].tar", f"{tmp_path}/b.tar"]


@pytest.mark.slow
def test_a_list_item_matching_nothing_is_refused_naming_it(tmp_path):
    """`a/*.tar,typo/*.tar` read a/ alone: an item matching nothing was dropped unnoticed, with
    its share of the data. An item is matched whole (either brace alternative will do), and `**`
    reads every depth locally as fsspec does on S3 (it read one folder level only)."""
    for rel in ("a/x.tar", "a/d/y.tar", "a/d/e/z.tar", "b/w.tgz"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    spec = f"{tmp_path}/a/*.tar, {tmp_path}/typo/*.tar ,{tmp_path}/b/*.tgz"
    with pytest.raises(ValueError, match=rf"^inputs: '{tmp_path}/typo/\*.tar' matches nothing "
                                         rf"\(an item of '{re.escape(spec)}'\)$"):
        url_listing.expand_urls(spec, "inputs")
    with pytest.raises(ValueError, match=rf"^k: '{tmp_path}/{{c,d}}/\*.tar' matches nothing$"):
        url_listing.expand_urls(f"{tmp_path}/{{c,d}}/*.tar", "k")
    assert url_listing.expand_urls(f"{tmp_path}/{{a,b}}/*.tgz,,{tmp_path}/a/x.tar", "k") == [
        f"{tmp_path}/b/w.tgz", f"{tmp_path}/a/x.tar"]
    assert url_listing.expand_urls(f"{tmp_path}/a/**/*.tar", "k") == [
        f"{tmp_path}/a/d/e/z.tar", f"{tmp_path}/a/d/y.tar", f"{tmp_path}/a/x.tar"]


@pytest.mark.slow
def test_an_s3_list_item_matching_nothing_is_refused_naming_it(s3_bucket):
    """As locally: a mistyped prefix or bucket in a list of S3 patterns was dropped unnoticed."""
    storage.write_bytes_atomic(f"{s3_bucket}/p/a.tar", b"x")
    storage.write_bytes_atomic(f"{s3_bucket}/p/d/e/b.tar", b"x")
    for typo in (f"{s3_bucket}/typo/*.tar", f"{s3_bucket}-typo/p/*.tar"):
        with pytest.raises(ValueError, match=rf"^inputs: '{re.escape(typo)}' matches nothing \("):
            url_listing.expand_urls(f"{s3_bucket}/p/*.tar,{typo}", "inputs")
    assert url_listing.expand_urls(f"{s3_bucket}/p/**/*.tar", "k") == [
        f"{s3_bucket}/p/a.tar", f"{s3_bucket}/p/d/e/b.tar"]


@pytest.mark.slow
def test_an_s3_object_version_is_an_input_like_any_file(s3_bucket):
    """`x.tar?versionId=V` was dropped from a list of inputs (its `?` read as a glob) and, beside
    another name in its folder, reported missing (a listing holds only current objects)."""
    import boto3

    bucket = s3_bucket[len("s3://"):]
    client = boto3.client("s3")
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    storage.write_bytes_atomic(f"{s3_bucket}/v/x.tar", b"old")
    storage.write_bytes_atomic(f"{s3_bucket}/v/x.tar", b"newer")
    storage.write_bytes_atomic(f"{s3_bucket}/v/y.tar", b"y")
    versions = client.list_object_versions(Bucket=bucket, Prefix="v/x.tar")["Versions"]
    old = next(f"{s3_bucket}/v/x.tar?versionId={v['VersionId']}" for v in versions
               if not v["IsLatest"])
    urls = url_listing.expand_urls(f"{old},{s3_bucket}/v/y.tar", "x")
    assert urls == [old, f"{s3_bucket}/v/y.tar"]
    assert url_listing.file_sizes(urls) == {old: 3, f"{s3_bucket}/v/y.tar": 1}
    assert storage.read_bytes(old) == b"old"


@pytest.mark.slow
def test_a_remote_url_with_an_empty_path_segment_is_refused(s3_bucket):
    """`checkpoint.dir=s3://b/runs//ck` wrote owner.json, then failed with the bare message
    "b/runs//ck": S3 keeps the `//` in keys, and s3fs cannot list below it, so whatever bdt
    writes there is found missing afterwards."""
    url = f"{s3_bucket}/runs//ck/a.bin"
    for call in (lambda: storage.write_bytes_atomic(url, b"x"), lambda: storage.exists(url),
                 lambda: url_listing.file_sizes([url, url + "2"])):
        with pytest.raises(ValueError, match="/runs//ck.*: empty path segment"):
            call()
    fs, _ = storage.filesystem(s3_bucket)
    assert fs.find(s3_bucket[len("s3://"):]) == []
    assert storage.filesystem(s3_bucket + "/runs/ck/")[1].endswith("/runs/ck")  # a last "/": fine


@pytest.mark.slow
def test_an_output_url_without_a_bucket_is_refused(s3_bucket):
    """`--out s3://` was "s3:// exists and is not empty" (the store's list of buckets), and with
    --overwrite a write probe's short-URL error: neither said that no bucket was named."""
    for url in ("s3://", "s3:///"):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=f"^{url} names no bucket"):
                output_dirs.refuse_nonempty_dir(url, overwrite=overwrite)


def test_a_file_in_a_directorys_place_is_named(tmp_path):
    """A tokenizer export, a shard folder or a run dir that is a plain file: the error says a
    file is in the way (it was a bare '[Errno 17] File exists')."""
    (tmp_path / "export").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="a file of that name .* is in the way"):
        storage.makedirs(str(tmp_path / "export"))
    with pytest.raises(NotADirectoryError):
        storage.makedirs(str(tmp_path / "export" / "below"))
    storage.makedirs(str(tmp_path / "fine" / "below"))
    assert (tmp_path / "fine" / "below").is_dir()


def test_a_local_name_with_double_colons_is_that_name(tmp_path):
    """fsspec chains filesystems at '::' and kept only the part before it: a local run dir
    `/x/a::b/run` wrote into `/x/a`. Local names keep their '::'; a remote URL holding one is
    refused before anything is read or written."""
    target = tmp_path / "exp::2" / "out"
    storage.makedirs(str(target))
    storage.write_bytes_atomic(str(target / "f.txt"), b"x")
    assert (target / "f.txt").read_bytes() == b"x" and not (tmp_path / "exp").exists()
    fs, path = storage.filesystem(str(target / "f.txt"))
    assert fs.cat_file(path) == b"x"
    with pytest.raises(ValueError, match="'::' in a URL"):
        storage.filesystem("s3://bucket/exp::2/out")


@pytest.mark.parametrize("form", ["~/out/f.bin", "file:{home}/out/f.bin", "file://{home}/out/f.bin",
                                  "local://{home}/out/f.bin"])
def test_a_local_write_goes_where_reads_of_the_name_look(tmp_path, monkeypatch, form):
    """fsspec reads `~/x` as $HOME/x and `file:/x` as /x; the atomic writers took the name as
    given and wrote into folders named `~` and `file:` under the working directory, which no
    read of the name found (`bdt data shapes --out ~/d` refused its own probe file)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    url = form.format(home=home)
    storage.write_bytes_atomic(url, b"x")
    assert storage.create_exclusive(url + ".lock", b"y")
    assert storage.exists(url) and storage.read_bytes(url) == b"x"
    assert sorted(os.listdir(home / "out")) == ["f.bin", "f.bin.lock"]
    assert os.listdir(cwd) == []


def test_a_relative_name_through_a_missing_folder_and_dotdot_is_written(tmp_path, monkeypatch):
    """`new/../out/f`: the temp file went to the normalized folder and its rename to the name as
    given failed (ENOENT: `new` did not exist); as `mkdir -p`, the OS's reading of the name."""
    monkeypatch.chdir(tmp_path)
    storage.write_bytes_atomic("new/../out/f.bin", b"x")
    assert (tmp_path / "out" / "f.bin").read_bytes() == b"x"
    assert url_listing.file_sizes(["new/../out/f.bin"]) == {"new/../out/f.bin": 1}


def test_a_glob_under_tilde_or_a_file_url_matches_what_its_names_read(tmp_path, monkeypatch):
    """`inputs=~/raw/*.tar` matched nothing (a folder named `~` was globbed) while
    `~/raw/a.tar` alone read $HOME/raw/a.tar: extraction said nothing matched files that exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.tar").write_bytes(b"x")
    assert url_listing.expand_urls("~/raw/*.tar", "x") == [str(tmp_path / "raw" / "a.tar")]
    assert url_listing.expand_urls(f"file://{tmp_path}/raw/*.tar", "x") == [str(tmp_path / "raw" / "a.tar")]


def test_a_lost_connection_left_in_a_background_task_prints_no_traceback(caplog):
    """A dying endpoint mid-upload: aiohttp's writer task keeps the connection error the call
    raised and asyncio printed its traceback beside the one-line error (a flaky fault test).
    Only such errors are quieted: any other unretrieved task error is still reported."""
    import asyncio
    import logging

    import aiohttp

    fs, _ = storage.filesystem("s3://bdt-never-contacted/x")  # no request is made

    def leave_unretrieved(error: BaseException) -> None:
        async def fail():
            raise error

        async def start():
            asyncio.ensure_future(fail())  # the task is dropped: nobody retrieves its error
            await asyncio.sleep(0.05)

        # the dropped task is freed (and reported) in the loop's thread when it ends, inside start
        asyncio.run_coroutine_threadsafe(start(), fs.loop).result(timeout=10)

    def reported() -> list[str]:
        return [r.getMessage().splitlines()[0] for r in caplog.records
                if r.name == "asyncio" and r.levelno >= logging.ERROR]

    with caplog.at_level(logging.DEBUG):
        leave_unretrieved(aiohttp.ClientConnectionResetError("Cannot write to closing transport"))
        leave_unretrieved(ConnectionResetError("reset by peer"))
        assert reported() == []
        leave_unretrieved(ValueError("a bug, not a lost connection"))
        assert reported() == ["Task exception was never retrieved"]


def test_real_local_path_gives_one_name_for_every_spelling(tmp_path, monkeypatch):
    """The one rule of extraction's resolved inputs and the streams' shard names."""
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    real = os.path.realpath(tmp_path / "d")
    spellings = ["d", "./d/", "link", f"{tmp_path}/x/../d", f"file://{tmp_path}/link"]
    assert {storage.real_local_path(s) for s in spellings} == {real}
    with pytest.raises(ValueError, match="short of a '/'"):
        storage.real_local_path("s3:/bucket/d")


@pytest.mark.slow
def test_an_exclusive_create_whose_answer_was_lost_is_still_this_writers(s3_bucket, flaky_s3):
    """S3 stored the conditional put but the connection died before its answer; botocore sent it
    again, met the object just written (412) and create_exclusive said another writer held the
    name: an extraction refused its output naming itself as the other run, and left its lock."""
    from bdt.extract.manifest import LOCK_NAME, output_lock

    url = s3_bucket + "/lock.json"
    flaky_s3.plan("PUT", "cut")
    assert storage.create_exclusive(url, b"mine")
    assert not storage.create_exclusive(url, b"another writer's")
    assert storage.read_bytes(url) == b"mine"
    flaky_s3.plan("PUT", "cut")
    with output_lock(s3_bucket + "/out"):
        assert storage.exists(s3_bucket + "/out/" + LOCK_NAME)
    assert not storage.exists(s3_bucket + "/out/" + LOCK_NAME)
    assert flaky_s3.injected == {("PUT", "cut"): 2}


@pytest.mark.slow
def test_an_exclusive_create_meeting_a_name_let_go_meanwhile_takes_it(s3_bucket, monkeypatch):
    """Another writer held the name at the conditional put (412) and deleted it before the
    read-back: that read raised FileNotFoundError out of a lock's acquire; the name is free."""
    url = s3_bucket + "/let-go.lock"
    assert storage.create_exclusive(url, b"theirs")
    fs, path = storage.filesystem(url)
    read_back = fs.cat_file

    def holder_lets_go_first(p, *args, **kwargs):
        fs.rm_file(path)
        return read_back(p, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", holder_lets_go_first)
    assert storage.create_exclusive(url, b"mine")
    monkeypatch.undo()
    assert storage.read_bytes(url) == b"mine"


@pytest.mark.slow
def test_a_write_whose_answers_are_lost_on_every_retry_is_an_oserror_naming_it(s3_bucket, flaky_s3,
                                                                              monkeypatch):
    """botocore's ConnectionClosedError is no OSError: callers that turn an OSError into a
    one-line error naming the file let it through as a traceback."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # s3fs's own retries remain: seconds, not 25
    url = s3_bucket + "/eval.json"
    flaky_s3.plan("PUT", *["cut"] * 50)  # more than every retry
    with pytest.raises(OSError, match=f"cannot write {url}: ConnectionClosedError"):
        storage.write_bytes_atomic(url, b"{}")


@pytest.mark.slow
def test_a_part_lost_on_every_retry_aborts_the_upload_and_names_the_object(s3_bucket, flaky_s3,
                                                                            monkeypatch):
    """A write larger than a block uploads a part from inside the block (s3fs's multipart):
    botocore's error escaped there unnamed. The upload is aborted: no object, no parts kept."""
    import fsspec.config
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # s3fs's own retries remain: seconds
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf["s3"],
                                                   "default_block_size": 5 * 2**20})
    s3fs.S3FileSystem.clear_instance_cache()
    url = s3_bucket + "/ck/model.bin"
    flaky_s3.plan("PUT", *["cut"] * 50)  # more than every retry
    with pytest.raises(OSError, match=f"cannot write {url}: ConnectionClosedError"):
        with storage.open_atomic(url) as f:
            f.write(b"x" * (6 * 2**20))  # past the block: its part goes up now
    fs, path = storage.filesystem(url)
    assert flaky_s3.injected[("PUT", "cut")] >= 2 and not fs.exists(path)
    bucket = s3_bucket.split("://", 1)[1]
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
