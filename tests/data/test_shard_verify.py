"""An extraction output's shards against its manifest: the size check at every training start
(list_shards) and the full sha256 check of `bdt data verify`; local shards a folder, glob or
name lists are regular files."""

import json
import os
import re

import pytest

from bdt import storage
from bdt.cli import main as bdt_main
from bdt.data.shard_source import list_shards
from bdt.extract.manifest import build_index, json_bytes
from trainutil import write_shards

FAMILY = "f"


def extraction_output(root: str, work: str, num_shards: int = 3) -> list[str]:
    """Token shards of family FAMILY under `root` (local or s3://; written in `work` first) with
    the index.json an extraction writes for them (manifest.build_index over their sizes and
    hashes)."""
    markers, urls = [], []
    for k, local in enumerate(write_shards(os.path.join(work, FAMILY), [(4, 4)], num_shards, 2)):
        urls.append(storage.join(root, FAMILY, os.path.basename(local)))
        if urls[-1] != local:
            fs, path = storage.filesystem(urls[-1])
            fs.put_file(local, path)
        sha, size = storage.sha256(urls[-1])
        markers.append({"index": k, "source": f"raw-{k}.tar", "samples": 2, "inputs": 2, "rejected": 0,
                        "bytes": size, "sha256": sha})
    index = build_index(root, {"sha256": {}}, {}, {FAMILY: {"buckets": [[64, 64]]}}, {FAMILY: markers})
    storage.write_bytes_atomic(storage.join(root, "index.json"), json_bytes(dict(index, complete=True)))
    return urls


def _edit(url: str, change) -> None:
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, change(fs.cat_file(path)))


def test_a_shard_of_another_size_than_listed_is_refused_before_training(tmp_path):
    urls = extraction_output(str(tmp_path), str(tmp_path))
    assert list_shards(str(tmp_path), FAMILY).urls == urls
    size = os.path.getsize(urls[1])
    _edit(urls[1], lambda data: data[:-512])  # truncated: still a readable tar, one sample short
    with pytest.raises(ValueError, match=rf"1 shard\(s\) of family 'f' differ in size from the "
                                         rf"manifest, e.g. {urls[1]}: {size} bytes listed, "
                                         rf"{size - 512} found"):
        list_shards(str(tmp_path), FAMILY)
    _edit(urls[1], lambda data: data + b"\0" * 1024)  # replaced by a longer file
    with pytest.raises(ValueError, match=rf"{size} bytes listed, {size + 512} found"):
        list_shards(str(tmp_path), FAMILY, allow_incomplete=True)


@pytest.mark.parametrize("size", ['"12"', "-1", "1.5"])
def test_a_listed_size_that_is_no_byte_count_is_damage(tmp_path, size):
    extraction_output(str(tmp_path), str(tmp_path), 1)
    index = (tmp_path / "index.json").read_text()
    entry = json.loads(index)["stages"][FAMILY]["shards"][0]
    (tmp_path / "index.json").write_text(index.replace(f'"bytes": {entry["bytes"]}', f'"bytes": {size}'))
    with pytest.raises(ValueError, match=r"index.json is damaged: shard 'f/000000.tar' has 'bytes' "):
        list_shards(str(tmp_path), FAMILY)


def test_a_family_named_twice_is_verified_once(tmp_path, capsys):
    extraction_output(str(tmp_path), str(tmp_path), 3)
    assert bdt_main(["data", "verify", str(tmp_path), "--family", FAMILY, "--family", FAMILY]) == 0
    assert "verified 3 shard(s)" in capsys.readouterr().out


def test_verify_reads_every_shard_and_names_each_that_differs(tmp_path, capsys):
    urls = extraction_output(str(tmp_path), str(tmp_path))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 0
    assert "verified 3 shard(s)" in capsys.readouterr().out
    # One byte flipped in a sample's data: the size matches, so only the sha256 can tell.
    _edit(urls[0], lambda data: data[:700] + bytes([data[700] ^ 1]) + data[701:])
    list_shards(str(tmp_path), FAMILY)
    _edit(urls[2], lambda data: data[:-512])
    assert bdt_main(["data", "verify", str(tmp_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:-1]] == [f"BAD {urls[0]}", f"BAD {urls[2]}"]
    assert "sha256" in out[0] and "the manifest lists" in out[0] and "bytes" in out[1]
    assert out[-1].endswith("2 problem(s), named above")
    assert bdt_main(["data", "verify", str(tmp_path), "--family", "nope"]) == 2
    assert "has no family 'nope'" in capsys.readouterr().err
    assert bdt_main(["data", "verify", str(tmp_path / FAMILY)]) == 2
    assert "holds no index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_sizes_are_checked_on_s3_too(s3_bucket, tmp_path, capsys):
    root = s3_bucket + "/tokens"
    urls = extraction_output(root, str(tmp_path))
    assert list_shards(root, FAMILY).urls == urls
    _edit(urls[2], lambda data: data[:-512])
    with pytest.raises(ValueError, match=rf"e.g. {urls[2]}: \d+ bytes listed, \d+ found"):
        list_shards(root, FAMILY)
    assert bdt_main(["data", "verify", root]) == 1
    assert capsys.readouterr().out.startswith(f"BAD {urls[2]}: ")


def test_shards_that_are_symlinks_to_files_are_found(tmp_path):
    """Outputs assembled with links to shared storage: a listing reports a link as no file."""
    urls = extraction_output(str(tmp_path / "out"), str(tmp_path / "out"))
    for url in urls:
        os.rename(url, str(tmp_path / os.path.basename(url)))
        os.symlink(tmp_path / os.path.basename(url), url)
    assert list_shards(str(tmp_path / "out"), FAMILY).urls == urls
    assert bdt_main(["data", "verify", str(tmp_path / "out")]) == 0
    os.remove(urls[1])
    os.symlink(tmp_path / "gone.tar", urls[1])  # a dangling link is a missing shard
    with pytest.raises(ValueError, match=rf"lists 1 shard\(s\) of family 'f' that do not exist, "
                                         rf"e.g. {urls[1]}"):
        list_shards(str(tmp_path / "out"), FAMILY)


def _edit_index(root, change) -> None:
    manifest = json.loads((root / "index.json").read_text())
    change(manifest)
    (root / "index.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("second", ["f/000000.tar", "f/./000000.tar"])
def test_a_shard_listed_twice_is_damage(tmp_path, capsys, second):
    extraction_output(str(tmp_path), str(tmp_path), 2)
    _edit_index(tmp_path, lambda m: m["stages"][FAMILY]["shards"].append(
        dict(m["stages"][FAMILY]["shards"][0], shard=second)))
    with pytest.raises(ValueError, match=rf"index.json is damaged: family 'f' lists the shard "
                                         rf"'{second}' twice"):
        list_shards(str(tmp_path), FAMILY)
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2
    assert "twice" in capsys.readouterr().err


def test_verify_refuses_a_shard_listed_by_two_families(tmp_path, capsys):
    extraction_output(str(tmp_path), str(tmp_path), 2)
    _edit_index(tmp_path, lambda m: m["stages"].__setitem__("g", m["stages"][FAMILY]))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the shard 'f/000000.tar' is listed by the families 'f' and 'g'" in err, err
    assert bdt_main(["data", "verify", str(tmp_path), "--family", "g"]) == 0


@pytest.mark.parametrize("sha", ["123", '["ab"]', '{"a": 1}'])
def test_a_sha256_that_is_no_string_is_damage(tmp_path, capsys, sha):
    extraction_output(str(tmp_path), str(tmp_path), 1)
    _edit_index(tmp_path, lambda m: m["stages"][FAMILY]["shards"][0].update(sha256=json.loads(sha)))
    with pytest.raises(ValueError, match=r"index.json is damaged: shard 'f/000000.tar' has 'sha256'"):
        list_shards(str(tmp_path), FAMILY)
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2


def test_verify_exit_codes_on_unusable_manifests(tmp_path, capsys):
    extraction_output(str(tmp_path), str(tmp_path), 1)
    (tmp_path / "index.json").write_text("[" * 100_000 + "]" * 100_000)  # past the parser's depth
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2
    assert "index.json is damaged (RecursionError" in capsys.readouterr().err
    with pytest.raises(ValueError, match="index.json is damaged"):
        list_shards(str(tmp_path), FAMILY)
    (tmp_path / "index.json").write_text(json.dumps({"stages": {}, "complete": True}))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2
    assert "lists no shards: nothing to verify" in capsys.readouterr().err
    (tmp_path / "index.json").write_text(json.dumps({"stages": None, "complete": True}))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2  # once a TypeError traceback
    assert "index.json is damaged (not an extraction manifest)" in capsys.readouterr().err
    assert bdt_main(["data", "verify", ""]) == 2  # once looked for /index.json
    assert "an empty path" in capsys.readouterr().err


def _drop_entry(m):
    m["stages"][FAMILY]["shards"].pop(1)


def _drop_entry_and_fix_totals(m):
    _drop_entry(m)
    m["stages"][FAMILY]["totals"] = {k: sum(s[k] for s in m["stages"][FAMILY]["shards"])
                                     for k in ("samples", "inputs", "rejected", "bytes")}


def _add_entry(m):
    shards = m["stages"][FAMILY]["shards"]
    shards.append(dict(shards[0], shard="f/copy.tar"))


def _edit_counts(m):
    m["stages"][FAMILY]["shards"][0]["samples"] = 5


@pytest.mark.parametrize("damage,message", [
    (_drop_entry, r"family 'f' totals inputs 6, its shards add up to 4"),
    (_drop_entry_and_fix_totals, r"it says complete, with 3 input unit\(s\), but family 'f' lists 2 shard"),
    (_add_entry, r"family 'f' totals inputs 6, its shards add up to 8"),
    (_edit_counts, r"shard 'f/000000.tar' lists inputs 2, samples 5 and rejected 0, which do not add up"),
])
def test_a_manifest_whose_counts_do_not_add_up_is_damage(tmp_path, capsys, damage, message):
    """Every listed shard matched its hash, so an entry removed or added by hand passed both
    checks: training read a part of the data, or a shard twice, from a 'complete' manifest."""
    urls = extraction_output(str(tmp_path), str(tmp_path), 3)
    os.link(urls[0], tmp_path / FAMILY / "copy.tar")
    _edit_index(tmp_path, lambda m: m.update(summary={"units": 3}))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 0
    _edit_index(tmp_path, damage)
    with pytest.raises(ValueError, match=rf"index.json is damaged: {message}"):
        list_shards(str(tmp_path), FAMILY)
    assert bdt_main(["data", "verify", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_verify_checks_rejects_jsonl_against_the_counts(tmp_path, capsys):
    """rejects.jsonl was never read: cut, emptied or garbled, it passed."""
    extraction_output(str(tmp_path), str(tmp_path), 2)

    def one_reject_per_shard(m):
        for s in m["stages"][FAMILY]["shards"]:
            s.update(inputs=3, rejected=1)
        m["stages"][FAMILY]["totals"].update(inputs=6, rejected=2)

    _edit_index(tmp_path, one_reject_per_shard)
    rejects = tmp_path / "rejects.jsonl"
    good = "".join(json.dumps({"key": f"k{i}", "source": "raw.tar", "reason": "too_small", "detail": ""}) + "\n"
                   for i in range(2))
    for text, problem in [(good, None), (good.splitlines(True)[0], "1 reject(s), the manifest counts 2"),
                          (good + "{\n", "line 3 is not a reject record"), (None, "missing, the manifest counts 2 reject(s)")]:
        if text is None:
            rejects.unlink()
        else:
            rejects.write_text(text)
        assert bdt_main(["data", "verify", str(tmp_path)]) == (1 if problem else 0)
        out = capsys.readouterr().out
        assert (f"BAD {rejects}: {problem}\n" in out) if problem else "all match index.json" in out


def test_verify_says_an_unfinished_extraction_is_not_all_there(tmp_path, capsys):
    """Every listed shard matched, so verify said `all match` and exited 0 on a manifest that says
    complete: false, which training refuses: now a BAD line and exit 1."""
    extraction_output(str(tmp_path), str(tmp_path), 2)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_bytes(json_bytes(dict(
        index, complete=False, summary={"units": 3, "done_units": 2,
                                        "failed_units": {"2": "raw-2.tar: unreadable"}})))
    assert bdt_main(["data", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("BAD ") and "incomplete (complete: false; failed input units ['2'])" \
        in out[0] and out[-1].endswith("1 problem(s), named above")


@pytest.mark.parametrize("form", ["folder", "glob", "name"])
def test_a_fifo_among_local_shards_is_refused_at_listing(tmp_path, form):
    """A FIFO named like a shard was listed as one: the start's first-sample check or the
    stream then blocked opening it, waiting for a writer that never came."""
    write_shards(str(tmp_path), [(4, 4)], 2, 2)
    fifo = tmp_path / "000000.tar"
    os.remove(fifo)
    os.mkfifo(fifo)
    source = {"folder": str(tmp_path), "glob": str(tmp_path / "*.tar"), "name": str(fifo)}[form]
    with pytest.raises(ValueError, match=f"^shards: {fifo} is not a regular file"):
        list_shards(source)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["folder", "glob", "name"])
def test_an_s3_prefix_named_like_a_shard_is_refused_at_listing(s3_bucket, tmp_path, form):
    """An S3 "folder" a pattern matched (`tokens/x.tar/...`) was listed as a shard and read as
    a damaged one: skipped in every epoch, its files never read, with one warning."""
    (url,) = write_shards(str(tmp_path), [(4, 4)], 1, 2)
    root = s3_bucket + "/tokens"
    storage.write_bytes_atomic(f"{root}/000000.tar", open(url, "rb").read())
    storage.write_bytes_atomic(f"{root}/x.tar/000001.tar", open(url, "rb").read())
    source = {"folder": root, "glob": f"{root}/*.tar", "name": f"{root}/x.tar"}[form]
    with pytest.raises(ValueError, match=f"^shards: {root}/x.tar is not a regular file"):
        list_shards(source)
    assert list_shards(f"{root}/0*.tar").urls == [f"{root}/000000.tar"]
