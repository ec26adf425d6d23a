"""Reading raw inputs without Ray: listing, grouping, and every problem turned into a Reject."""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
from collections import Counter

import pytest
import webdataset as wds
from extract_rawdata import good_samples, image_bytes, truncate, write_tar
from testkit import pauses_that

from bdt.extract import input_reading, input_units

EXTS = ["jpg", "jpeg", "png", "webp"]


def _read(path: str, max_bytes: int = 1 << 20, max_caption: int = 1 << 20) -> list:
    unit = input_units.list_units(path, "auto", 10, EXTS)[0]
    return list(input_reading.iter_unit(unit, EXTS, max_bytes, max_caption_bytes=max_caption))


def _pipeline_main(argv: list[str]) -> None:
    """pipelines/extract_tokens.py's main (a script, not a module of the package)."""
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), "..", "..", "pipelines", "extract_tokens.py")
    spec = importlib.util.spec_from_file_location("extract_tokens_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _rejects(items) -> list[tuple[str, str]]:
    return [(r.key, r.reason) for r in items if isinstance(r, input_reading.Reject)]


def test_listing_by_brace_glob_and_comma(tmp_path):
    for i in range(3):
        write_tar(str(tmp_path / f"s-{i}.tar"), good_samples("a", 1, i))
    brace = input_units.list_units(str(tmp_path / "s-{0..2}.tar"), "auto", 10, EXTS)
    glob = input_units.list_units(str(tmp_path / "s-*.tar"), "auto", 10, EXTS)
    assert [u.source for u in brace] == [u.source for u in glob] == [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert [u.index for u in brace] == [0, 1, 2]
    both = input_units.list_units(f"{tmp_path}/s-2.tar,{tmp_path}/s-*.tar", "auto", 10, EXTS)
    assert [u.source[-7:] for u in both] == ["s-2.tar", "s-0.tar", "s-1.tar"]  # order kept, no repeats
    with pytest.raises(ValueError, match=r"inputs: '.*nope-\*.tar' matches nothing"):
        input_units.list_units(str(tmp_path / "nope-*.tar"), "auto", 10, EXTS)
    with pytest.raises(ValueError, match=r"1 tar shard\(s\) not found or not a file, e.g. .*s-3.tar"):
        input_units.list_units(str(tmp_path / "s-{0..3}.tar"), "auto", 10, EXTS)


@pytest.mark.slow
def test_s3_inputs_are_checked_with_one_listing_per_prefix(s3_bucket, caplog):
    """Not one HEAD per shard: a brace pattern over many objects must cost one list call per
    prefix (counted from s3fs's own request log, against the moto server)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as w:
        w.write(good_samples("a", 1, 0)[0])
    for prefix in ("p", "q"):
        for i in range(6):
            fs.pipe_file(f"{s3_bucket[5:]}/{prefix}/s-{i}.tar", buf.getvalue())
    caplog.set_level(logging.DEBUG, logger="s3fs")
    caplog.clear()
    units = input_units.list_units(f"{s3_bucket}/p/s-{{0..5}}.tar,{s3_bucket}/q/s-{{0..5}}.tar",
                                   "auto", 10, EXTS)
    calls = Counter(r.getMessage().split(" - ")[0][len("CALL: "):] for r in caplog.records
                    if r.name == "s3fs" and r.getMessage().startswith("CALL: "))
    assert [u.source for u in units][:2] == [f"{s3_bucket}/p/s-0.tar", f"{s3_bucket}/p/s-1.tar"]
    assert len(units) == 12 and calls == Counter({"list_objects_v2": 2})
    with pytest.raises(ValueError, match=r"2 tar shard\(s\) not found or not a file, e.g. s3://.*/p/s-6.tar"):
        input_units.list_units(f"{s3_bucket}/p/s-{{0..7}}.tar", "auto", 10, EXTS)


@pytest.mark.parametrize("data", [b"this is not a tar archive" * 40, b""])
def test_not_a_tar_is_one_unreadable_reject(tmp_path, data):
    path = tmp_path / "junk.tar"
    path.write_bytes(data)  # an empty file too: a failed download is not an empty shard
    assert _rejects(_read(str(path))) == [("", "unreadable_shard")]


def test_truncated_tar_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    path = str(tmp_path / "t.tar")
    write_tar(path, good_samples("t", 6, 0))
    truncate(path, 0.6)
    items = _read(path)
    good = [i.key for i in items if isinstance(i, input_reading.RawSample)]
    assert good and good == [f"t{i:04d}" for i in range(len(good))] and len(good) < 6
    assert len(_rejects(items)) == 1 and _rejects(items)[0][1] == "truncated_tar"


def _verdicts(items) -> list[tuple[str, str]]:
    return [(i.key, getattr(i, "reason", "sample")) for i in items]


def test_a_decompression_bomb_keeps_what_was_read_and_rejects_the_rest(tmp_path, monkeypatch):
    """Before: a member of GBs of zeros in a .tar.gz was decompressed whole to step over it as
    too large. The floor is 1 MiB here (256 MiB in use)."""
    monkeypatch.setattr("bdt.data.tar_reads.INFLATION_FLOOR", 1 << 20)
    plain = tmp_path / "b.tar"
    write_tar(str(plain), good_samples("t", 2, 0) + [{"__key__": "bomb", "png": bytes(16 << 20)}])
    path = tmp_path / "b.tar.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    items = _read(str(path))
    assert _verdicts(items) == [("t0000", "sample"), ("t0001", "sample"), ("bomb", "truncated_tar")]
    assert items[-1].detail.startswith("ReadError: decompression bomb: ")


def test_a_tar_gz_of_flat_bmps_is_read_whole(tmp_path, monkeypatch):
    """Uncompressed pictures of flat colour inflate like a bomb (here 900x): before, the
    samples past the floor were rejected as truncated_tar. The floor is 1 MiB here."""
    from PIL import Image

    monkeypatch.setattr("bdt.data.tar_reads.INFLATION_FLOOR", 1 << 20)
    samples = []
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (256, 256), (20 * i, 90, 200)).save(buf, "BMP")
        samples.append({"__key__": f"f{i:02d}", "bmp": buf.getvalue(), "txt": b"a blue square"})
    plain = tmp_path / "f.tar"
    write_tar(str(plain), samples)
    path = tmp_path / "f.tar.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    unit = input_units.list_units(str(path), "auto", 10, ["bmp"])[0]
    items = list(input_reading.iter_unit(unit, ["bmp"], 1 << 20, max_caption_bytes=1 << 10))
    assert _verdicts(items) == [(f"f{i:02d}", "sample") for i in range(12)]


def test_a_tar_missing_for_a_moment_is_read_again_not_rejected(tmp_path, monkeypatch, caplog):
    """Before: a tar that failed to open (here: gone for a moment; an NFS EIO, a timeout) gave
    an unreadable_shard reject and its unit was done without its samples."""
    path = str(tmp_path / "t.tar")
    write_tar(path, good_samples("t", 3, 0))
    unit, = input_units.list_units(path, "auto", 10, EXTS)
    os.rename(path, path + ".away")
    pauses = pauses_that(monkeypatch, lambda: os.rename(path + ".away", path))
    with caplog.at_level("WARNING", "bdt.extract.input_reading"):
        items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1 << 20))
    assert _verdicts(items) == [(f"t{i:04d}", "sample") for i in range(3)] and pauses == [1.0]
    assert f"{path}: reading from byte 0 failed (FileNotFoundError: " in caplog.text


def test_a_member_without_extension_is_rejected_once_across_a_failed_read(tmp_path, monkeypatch):
    """NOTES (no extension) lies inside sample a; the read fails after its reject was given and
    before a ends. The next try reads from a's start and meets NOTES again: before, its reject
    was recorded twice."""
    import errno
    import tarfile

    from bdt.data import tar_reads

    path = str(tmp_path / "t.tar")
    png = image_bytes(40, 40)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("a.png", png), ("NOTES", b"n" * 600), ("a.txt", b"one"),
                           ("b.png", png), ("b.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        fail_at = next(m.offset for m in tar.getmembers() if m.name == "a.txt")
    unit, = input_units.list_units(path, "auto", 10, EXTS)

    class FailsOnce:  # the file: one read that reaches a.txt's header fails, as on a flaky mount
        failed = False

        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            start = self.f.tell()
            if not FailsOnce.failed and start <= fail_at < (start + n if n >= 0 else 1 << 62):
                FailsOnce.failed = True
                raise OSError(errno.EIO, "Input/output error")
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

    wrap = tar_reads._Reads.__init__
    monkeypatch.setattr(tar_reads._Reads, "__init__", lambda self, f: wrap(self, FailsOnce(f)))
    pauses = pauses_that(monkeypatch)
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1 << 20))
    assert FailsOnce.failed and pauses == [1.0]
    assert _verdicts(items) == [("NOTES", "unknown_extension"), ("a", "sample"), ("b", "sample")]


@pytest.mark.slow
@pytest.mark.parametrize("back", [True, False])
def test_an_s3_tar_failing_mid_read_is_read_again_or_fails_its_unit(s3_bucket, tmp_path,
                                                                      monkeypatch, back):
    """A real fault on a real S3 API: the object goes missing mid-tar (404 on the next range
    request, a FileNotFoundError from s3fs). Before: the rest of the tar became truncated_tar
    rejects of good samples. Now it is read on from the sample it was at once back, and a
    failure that stays fails the unit (no rejects written: a rerun reads it again)."""
    import fsspec.config

    from bdt import storage

    monkeypatch.setitem(fsspec.config.conf["s3"], "default_block_size", 4096)  # many requests
    path = str(tmp_path / "t.tar")
    write_tar(path, good_samples("t", 12, 0))
    url = f"{s3_bucket}/t.tar"
    fs, key = storage.filesystem(url)
    fs.put_file(path, key)
    unit, = input_units.list_units(url, "auto", 10, EXTS)
    want = _verdicts(_read(path))
    pauses = pauses_that(monkeypatch, lambda: fs.put_file(path, key) if back else None)
    items = input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1 << 20)
    got = _verdicts([next(items)])
    fs.rm(key)
    if back:
        got += _verdicts(items)
        assert got == want and pauses == [1.0]
    else:
        with pytest.raises(OSError, match=rf"{url}: reading from byte [1-9]\d* failed 5 times in a "
                                          rf"row, .*The unit failed: a rerun reads it again"):
            list(items)
        assert pauses == [1.0, 2.0, 4.0, 8.0]


def test_duplicates_oversize_and_groups(tmp_path):
    path = str(tmp_path / "d.tar")
    png = image_bytes(40, 40)
    write_tar(path, [
        {"__key__": "x", "png": png, "txt": b"one"},
        {"__key__": "y", "png": png, "txt": b"two"},
        {"__key__": "x", "png": png, "txt": b"again"},  # same key, not adjacent
        {"__key__": "big", "png": png, "txt": b"c" * 7000},
        {"__key__": "bigimg", "png": png + b"\0" * 7000, "txt": b"c"},
        {"__key__": "z", "jpg": png, "png": png, "txt": b"first listed extension wins", "json": b"{}"},
    ])
    items = _read(path, max_bytes=6000, max_caption=100)
    assert _rejects(items) == [("x", "duplicate_key"), ("big", "caption_too_long"), ("bigimg", "too_large")]
    details = {r.key: r.detail for r in items if isinstance(r, input_reading.Reject)}
    assert details["big"] == "txt member of 7000 bytes exceeds max_caption_bytes 100"  # its own limit
    assert details["bigimg"].endswith("exceeds max_image_bytes 6000")
    samples = {i.key: i for i in items if isinstance(i, input_reading.RawSample)}
    assert sorted(samples) == ["x", "y", "z"] and samples["x"].caption == b"one"
    assert samples["z"].image_ext == "jpg"


def test_a_sample_of_many_members_is_one_too_large_reject(tmp_path, monkeypatch):
    """Members of many extensions, each under max_image_bytes, were all held in memory."""
    monkeypatch.setattr("bdt.data.tars.MAX_SAMPLE_BYTES", 20_000, raising=False)
    path = str(tmp_path / "m.tar")
    png = image_bytes(40, 40)
    junk = {f"x{i:02d}": b"\0" * 1000 for i in range(40)}
    write_tar(path, [{"__key__": "many", "png": png, "txt": b"c", **junk},
                     {"__key__": "ok", "png": png, "txt": b"c"}])
    items = _read(path, max_bytes=6000)
    assert _rejects(items) == [("many", "too_large")] and "in all" in items[0].detail
    assert [i.key for i in items if isinstance(i, input_reading.RawSample)] == ["ok"]


def test_hostile_names_and_repeats_are_judged_not_lost(tmp_path):
    """A name that is not UTF-8 once failed its whole unit (its key could not be written to
    JSON); a member repeated in a sample silently replaced the first one."""
    import json
    import tarfile

    path = tmp_path / "n.tar"
    png = image_bytes(40, 40)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in (("caf\udce9.png", png), ("caf\udce9.txt", b"cap"), ("two.png", png),
                           ("two.png", png), ("two.txt", b"cap"), ("\udcff.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = _read(str(path))
    assert [(i.key, getattr(i, "reason", "sample")) for i in items] == [
        ("caf\\xe9", "sample"), ("two", "duplicate_key"), ("\\xff", "sample")]
    assert "'two.png' appears twice" in items[1].detail
    json.dumps([i.key for i in items], ensure_ascii=False).encode("utf-8")  # as the worker writes


@pytest.mark.parametrize("raw,reason", [
    (None, "missing_caption"), (b" \t\n", "empty_caption"), (b"\xff\xfe", "caption_not_utf8"),
    (b"x" * 11, "caption_too_long"), (b"a\x00b", "caption_control_char"),
    (b"red \x1b[31m", "caption_control_char"), ("a\u0085b".encode(), "caption_control_char"),
    ("\ufeff".encode(), "empty_caption"), ("\u200b \u200b".encode(), "empty_caption"),
])
def test_caption_checks(raw, reason):
    assert input_reading.check_caption(raw, 10)[:2] == (None, reason)
    assert input_reading.check_caption(b"  a caption\n", 20) == ("a caption", "", "")
    assert input_reading.check_caption("\ufeffa caption".encode(), 20) == ("a caption", "", "")  # BOM
    assert input_reading.check_caption(b"two\tlines\r\nok", 20) == ("two\tlines\r\nok", "", "")


def test_one_verdict_per_sample(tmp_path):
    """A sample whose members are all bad is one reject, not one per member; a bad member
    (a link standing in for the image) rejects its whole sample."""
    import tarfile

    path = tmp_path / "v.tar"
    png = image_bytes(40, 40)
    with tarfile.open(path, "w") as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        for name, data in (("/abs/evil.png", png), ("/abs/evil.txt", b"cap"), ("/abs/evil.json", b"{}")):
            add(name, data)
        add("lnk.png", kind=tarfile.SYMTYPE)
        add("lnk.txt", b"a caption")
        add("ok.png", png)
        add("ok.txt", b"a caption")
        add("noext")
    items = _read(str(path))
    assert [(i.key, getattr(i, "reason", "sample")) for i in items] == [
        ("/abs/evil", "unsafe_path"), ("lnk", "not_a_file"), ("noext", "unknown_extension"),
        ("ok", "sample")]


def test_inputs_are_checked_before_ray_starts(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """A glob matching nothing fails the pipeline with exit code 2 before any Ray exists."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the inputs were checked"))
    with pytest.raises(SystemExit) as exit_info:
        _pipeline_main([f"inputs={tmp_path}/nothing-*.tar", f"output={tmp_path}/out",
                     f"tokenizer={tiny_tokenizer}"])
    assert exit_info.value.code == 2
    assert f"inputs: '{tmp_path}/nothing-*.tar' matches nothing" in capsys.readouterr().err


def test_config_values_are_checked_before_any_work(tmp_path, tiny_tokenizer):
    from bdt.config import load
    from bdt.extract.config import ExtractConfig
    from bdt.extract.run import plan

    base = [f"inputs={tmp_path}/x.tar", f"output={tmp_path}/out", f"tokenizer={tiny_tokenizer}"]
    write_tar(str(tmp_path / "x.tar"), good_samples("a", 1, 0))
    for override, message in [("dtype=fp8", "dtype: expected one of"), ("batch_size=0", "batch_size: must be >= 1"),
                              ("stages=[{resolution: 30}]", r"stages\[0\] \(30\): .*not a multiple of 4"),
                              ("stages=[{resolution: 32, buckets: [[32, 30]]}]", "multiples of 4")]:
        with pytest.raises(ValueError, match=message):
            plan(load(ExtractConfig, [], base + [override]))
    assert not (tmp_path / "out").exists()
    units, stages, identity, fp = plan(load(ExtractConfig, [], base + ["stages=[{resolution: 32}]", "patch_size=2"]))
    assert len(units) == 1 and all(w % 8 == 0 and h % 8 == 0 for w, h in stages["32"])
    assert identity["downsample_factor"] == 4 and len(fp) == 16
    # dtype auto means fp32 on CPU actors and bf16 on GPU ones: shards that differ, fingerprints too.
    gpu = plan(load(ExtractConfig, [], base + ["stages=[{resolution: 32}]", "patch_size=2",
                                              "gpus_per_actor=1"]))
    assert gpu[3] != fp


@pytest.mark.parametrize("plan", [b'{"units": [{"ind', b"[]"])
def test_a_damaged_plan_is_refused_not_rewritten(tmp_path, plan):
    """plan.json says which inputs the existing shards were made from: silently rewriting a
    damaged one would let other inputs mix into them."""
    from bdt.extract import manifest as mf

    (tmp_path / "plan.json").write_bytes(plan)
    unit = input_units.InputUnit(0, "tar", str(tmp_path / "x.tar")).to_dict()
    with pytest.raises(ValueError, match="plan.json is damaged"):
        mf.check_plan(str(tmp_path), [unit])
    assert (tmp_path / "plan.json").read_bytes() == plan
    mf.check_plan(str(tmp_path / "fresh"), [unit])  # no plan yet: written
    assert (tmp_path / "fresh" / "plan.json").exists()


@pytest.mark.parametrize("plan,problem", [
    (b'{"units": [{}]}', r"units\[0\].index is missing"), (b"{}", "'units' is missing"),
    (b'{"units": {"0": {}}}', "'units' is not a list"), (b'{"units": ["x.tar"]}', r"units\[0\] is not an object"),
    (b'{"units": [{"index": 0, "kind": "tar", "source": "x.tar", "files": "a.png"}]}',
     r"units\[0\].files is not a list"),
    (b'{"units": [{"index": 0, "kind": "tar", "files": []}]}', r"units\[0\].source is missing"),
    (b'"units"', "a JSON str, not an object"),
])
def test_a_plan_of_the_wrong_shape_is_refused_naming_the_key(tmp_path, plan, problem):
    """Valid JSON that is not a plan raised a bare KeyError or TypeError, or ({}) was taken for
    an empty plan and overwritten."""
    from bdt.extract import manifest as mf

    (tmp_path / "plan.json").write_bytes(plan)
    unit = input_units.InputUnit(0, "tar", str(tmp_path / "x.tar")).to_dict()
    with pytest.raises(ValueError, match=rf"{tmp_path}/plan.json is damaged \({problem}\)"):
        mf.check_plan(str(tmp_path), [unit])
    assert (tmp_path / "plan.json").read_bytes() == plan


def test_input_names_that_are_not_utf8_stop_the_run_before_any_work(tmp_path, tiny_tokenizer, capsys):
    """plan.json (JSON, UTF-8) failed to encode such a name after the output was made; a rename
    fixes it, while leaving the input out would change the shard plan once it is renamed."""
    root = os.fsencode(tmp_path)
    os.makedirs(tmp_path / "in")
    write_tar(str(tmp_path / "in" / "a.tar"), good_samples("a", 1, 0))
    write_tar(os.fsdecode(root + b"/in/shard\xff.tar"), good_samples("b", 1, 0))
    shown = repr(root + b"/in/shard\xff.tar")
    with pytest.raises(ValueError, match=r"1 input name\(s\) are not valid UTF-8: " + re.escape(shown)):
        input_units.list_units(f"{tmp_path}/in/*.tar", "auto", 10, EXTS)
    # A folder's image files are inputs too; its other files are only rejects (their names
    # appear in the rejects file as \xNN), so they do not stop anything.
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.png").write_bytes(image_bytes(40, 40))
    (folder / "ok.txt").write_text("a caption")
    with open(os.fsdecode(os.fsencode(folder) + b"/notes\xff.doc"), "wb") as f:
        f.write(b"x")
    unit, = input_units.list_units(str(folder), "auto", 10, EXTS)
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=100))
    assert _rejects(items) == [("notes\\xff.doc", "unknown_extension")]
    with open(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png"), "wb") as f:
        f.write(image_bytes(40, 40))
    with pytest.raises(ValueError, match="1 image file name.* " + re.escape(repr(os.fsencode(folder) + b"/caf\xe9.png"))):
        input_units.list_units(str(folder), "auto", 10, EXTS)
    # Through the job's entry point: exit code 2 naming the file, and no output folder left.
    with pytest.raises(SystemExit) as exit_info:
        _pipeline_main([f"inputs={tmp_path}/in/*.tar", f"output={tmp_path}/out/tokens", f"tokenizer={tiny_tokenizer}"])
    assert exit_info.value.code == 2 and shown in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_appending_inputs_drops_the_manifest_until_the_run_ends(tmp_path):
    """A run with appended inputs that is stopped early must not leave the old index.json
    (complete: true for the shorter plan) for training to take as the whole output."""
    from bdt.data.shard_source import list_shards
    from bdt.extract import manifest as mf

    units = [input_units.InputUnit(i, "tar", str(tmp_path / f"x{i}.tar")).to_dict() for i in range(2)]
    mf.check_plan(str(tmp_path), units[:1])
    (tmp_path / "index.json").write_bytes(mf.json_bytes({"complete": True, "stages": {"32": {"shards": []}}}))
    mf.check_plan(str(tmp_path), units[:1])  # the same plan: the manifest stays
    assert (tmp_path / "index.json").exists()
    mf.check_plan(str(tmp_path), units)
    with pytest.raises(ValueError, match="extraction output without index.json"):
        list_shards(str(tmp_path), "32")

def test_folder_links_and_non_files_are_refused_unread(tmp_path):
    """A caption linked to a file outside the folder once went into the shards as a caption; a
    directory named like a caption failed the whole unit."""
    (tmp_path / "secret").write_text("not for the dataset")
    root = tmp_path / "d"
    root.mkdir()
    for stem in ("ok", "lnk", "dir", "long"):
        (root / f"{stem}.png").write_bytes(image_bytes(40, 40))
    (root / "ok.txt").write_text("a caption")
    (root / "lnk.txt").symlink_to(tmp_path / "secret")
    (root / "dir.txt").mkdir()
    (root / "long.txt").write_text("x" * 101)
    unit = input_units.list_units(str(root), "auto", 10, EXTS)[0]
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=100))
    assert [(i.key, getattr(i, "reason", "sample")) for i in items] == [
        ("dir", "not_a_file"), ("lnk", "not_a_file"), ("long", "caption_too_long"), ("ok", "sample")]
    assert all(b"not for" not in (getattr(i, "caption", b"") or b"") for i in items)


def _folder(tmp_path, stems=("a", "b", "c")) -> str:
    root = tmp_path / "d"
    root.mkdir()
    for stem in stems:
        (root / f"{stem}.png").write_bytes(image_bytes(40, 40))
        (root / f"{stem}.txt").write_text(f"caption {stem}")
    return str(root)


@pytest.mark.parametrize("back", [True, False])
def test_a_folder_image_failing_to_read_is_read_again_or_fails_its_unit(tmp_path, monkeypatch,
                                                                         caplog, back):
    """Before: an image that failed to read (here: gone for a moment; an NFS EIO, an S3 outage)
    became an unreadable_shard reject and its unit was done without it. Now it is read again
    once back, and a failure that stays fails the unit (no rejects: a rerun reads it again)."""
    root = _folder(tmp_path, "abcd")
    unit = input_units.list_units(root, "auto", 2, EXTS)[1]  # c, d (the first unit reads the folder too)
    image, away = os.path.join(root, "d.png"), str(tmp_path / "d.png")
    os.rename(image, away)
    pauses = pauses_that(monkeypatch, lambda: os.rename(away, image) if back else None)
    items = input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1 << 20)
    if back:
        with caplog.at_level("WARNING", "bdt.extract.input_reading"):
            got = [(i.key, i.caption) for i in items]
        assert got == [(s, f"caption {s}".encode()) for s in "cd"] and pauses == [1.0]
        assert f"{unit.name}: reading 'd.png' failed (FileNotFoundError: " in caplog.text
    else:
        assert _verdicts([next(items)]) == [("c", "sample")]
        with pytest.raises(OSError, match=r"reading 'd.png' failed 5 times in a row, .*The unit "
                                          r"failed: a rerun reads it again"):
            next(items)
        assert pauses == [1.0, 2.0, 4.0, 8.0]


def test_a_folder_caption_failing_to_read_is_read_again_not_rejected(tmp_path, monkeypatch):
    """Before: a caption whose read failed with an I/O error made its sample an unreadable_shard
    reject, one gone between its lookup and its read a missing_caption one (the sample was
    written without its caption). The fault here: EIO on the caption's first read."""
    import errno

    from bdt import storage

    root = _folder(tmp_path, "ab")
    unit, = input_units.list_units(root, "auto", 10, EXTS)
    fs, _ = storage.filesystem(root)
    cat_file, failed = fs.cat_file, []

    def flaky(path, *args, **kwargs):
        if path.endswith("b.txt") and not failed:
            failed.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return cat_file(path, *args, **kwargs)
    monkeypatch.setattr(fs, "cat_file", flaky)
    pauses = pauses_that(monkeypatch)
    items = list(input_reading.iter_unit(unit, EXTS, 1 << 20, max_caption_bytes=1 << 20))
    assert [(i.key, i.caption) for i in items] == [("a", b"caption a"), ("b", b"caption b")]
    assert failed and pauses == [1.0]


def test_folder_links_that_lead_nowhere_are_refused_not_retried(tmp_path, monkeypatch):
    """A link that cannot be followed fails every read: it is bad data, refused at once (a
    retried one would fail its unit on every rerun)."""
    root = _folder(tmp_path, "a")
    (tmp_path / "d" / "c.png").write_bytes(image_bytes(40, 40))
    for name, target in [("gone.png", "nothing.png"), ("loop.png", "loop.png"), ("c.txt", "c.txt")]:
        os.symlink(os.path.join(root, target), os.path.join(root, name))
    pauses = pauses_that(monkeypatch)
    assert _verdicts(_read(root)) == [("a", "sample"), ("c", "not_a_file"), ("gone", "not_a_file"),
                                      ("loop", "not_a_file")]
    assert pauses == []


def test_folder_names_follow_the_tar_rules(tmp_path):
    """A file named just 'jpg' failed the whole unit; several images of one stem each became a
    sample (a tar sample uses the first of the image extensions); an upper-case caption
    extension was not found (tar extensions are case-blind)."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "jpg").write_bytes(image_bytes(40, 40))
    for name in ("a.webp", "a.png", "a.jpg", "b.PNG"):
        (root / name).write_bytes(image_bytes(40, 40))
    (root / "a.txt").write_text("first")
    (root / "b.TXT").write_text("second")
    items = _read(str(root))
    assert sorted((i.key, getattr(i, "reason", "sample")) for i in items) == [
        ("a", "sample"), ("a.png", "duplicate_key"), ("a.webp", "duplicate_key"), ("b", "sample"),
        ("jpg", "unknown_extension")]
    samples = {i.key: i for i in items if not isinstance(i, input_reading.Reject)}
    assert (samples["a"].image_ext, samples["a"].caption) == ("jpg", b"first")
    assert (samples["b"].image_ext, samples["b"].caption) == ("png", b"second")


def test_one_input_spelled_twice_is_one_unit(tmp_path, monkeypatch):
    """a.tar,./a.tar (or abs/rel, '//', a link) made two units, the same samples extracted twice."""
    write_tar(str(tmp_path / "a.tar"), good_samples("a", 1, 0))
    write_tar(str(tmp_path / "b.tar"), good_samples("b", 1, 0))
    os.symlink(tmp_path / "a.tar", tmp_path / "link.tar")
    os.makedirs(tmp_path / "sub")
    monkeypatch.chdir(tmp_path)
    for spec, sources in [("a.tar,./a.tar", ["a.tar"]), (f"a.tar,{tmp_path}/a.tar", ["a.tar"]),
                          (f"{tmp_path}/a.tar,{tmp_path}//a.tar", [f"{tmp_path}/a.tar"]),
                          ("a.tar,link.tar", ["a.tar"]), ("a.tar,sub/../a.tar,b.tar", ["a.tar", "b.tar"]),
                          ("*.tar", ["a.tar", "b.tar"])]:
        assert [u.source for u in input_units.list_units(spec, "auto", 10, EXTS)] == sources, spec


def test_an_output_inside_a_folder_input_is_refused(tmp_path, tiny_tokenizer):
    """The job's own shards and manifest were listed as the folder's files: rejected inputs."""
    from bdt.config import load
    from bdt.extract.config import ExtractConfig
    from bdt.extract.run import plan

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "p.png").write_bytes(image_bytes(40, 40))
    (folder / "p.txt").write_text("a caption")
    for output in (folder / "tokens", folder):
        cfg = load(ExtractConfig, [], [f"inputs={folder}/", f"output={output}", f"tokenizer={tiny_tokenizer}"])
        with pytest.raises(ValueError, match=f"output: {output} is inside the folder input {folder}/; put "):
            plan(cfg)
    assert sorted(os.listdir(folder)) == ["p.png", "p.txt"]
