"""The driver's final merge of the units' rejects files (run._finish), without Ray or a tokenizer:
the units' markers and rejects files are written here as the actors write them."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from bdt import storage
from bdt.config import load
from bdt.extract import manifest as mf
from bdt.extract import run as R
from bdt.extract.config import ExtractConfig

_DETAIL = "x" * 200  # a reject's detail is cut at 200 characters: the longest lines there are


def _rejects(unit: int, n: int) -> bytes:
    return b"".join(json.dumps({"key": f"u{unit}_{k:07d}", "source": f"in-{unit}.tar",
                                "reason": ("too_small", "corrupt_image")[k % 3 == 0],
                                "detail": _DETAIL}).encode() + b"\n" for k in range(n))


def _finish(root: str, rejected: list[int], write: bool = True, icc: list | None = None) -> dict:
    """run._finish over units whose rejects files hold `rejected[i]` lines each (written first
    unless `write` is False: there from an earlier call); `icc[i]`: unit i's icc_ignored, left
    out of its marker where None."""
    cfg = load(ExtractConfig, [], [f"inputs={root}/in-{{0..{len(rejected) - 1}}}.tar", f"output={root}",
                                   "tokenizer=unused", "stages=[{resolution: 32}]"])
    results = {}
    for i, n in enumerate(rejected):
        if n and write:
            storage.write_bytes_atomic(mf.rejects_url(root, i), _rejects(i, n))
        marker = {"index": i, "source": f"in-{i}.tar", "samples": 0, "inputs": n, "rejected": n,
                  "bytes": 0, "sha256": "", "upscaled": 0}
        if icc is None or icc[i] is not None:
            marker["icc_ignored"] = 0 if icc is None else icc[i]
        results[i] = {"skipped": False, "stages": {"32": marker}}
    return R._finish(cfg, list(range(len(rejected))), {"32": [[32, 32]]}, {}, results, {}, 1.0, 0)


def test_a_large_rejects_file_is_merged_without_holding_it(tmp_path):
    """Each unit's file was read whole, then decoded whole: a 2M-reject unit took ~800 MB twice."""
    root = str(tmp_path / "out")
    n = 60_000  # ~17 MB
    _finish(root, [n])  # writes the unit's file; the merge measured below is the rerun's
    tracemalloc.start()
    try:
        summary = _finish(root, [n], write=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["rejects_by_reason"] == {"corrupt_image": n // 3, "too_small": n - n // 3}
    assert open(f"{root}/{mf.REJECTS_NAME}", "rb").read() == _rejects(0, n)
    assert peak < 8 << 20, f"merging held {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("remote", [False, True])
def test_merged_rejects_keep_every_line_across_read_pieces(tmp_path, request, remote):
    """Lines split between two 1 MiB reads (storage.read_lines) come out whole, on S3 too."""
    root = (request.getfixturevalue("s3_bucket") + "/out") if remote else str(tmp_path / "out")
    counts = [9_000, 0, 3]  # ~2.6 MB: pieces end mid-line
    summary = _finish(root, counts)
    fs, path = storage.filesystem(storage.join(root, mf.REJECTS_NAME))
    assert fs.cat_file(path) == _rejects(0, counts[0]) + _rejects(2, counts[2])
    assert sum(summary["rejects_by_reason"].values()) == sum(counts)


@pytest.mark.parametrize("bad", [b'{"key": "u1_0000001", "rea', b"[1, 2]", b"\xff\xfe"])
def test_a_malformed_rejects_line_is_named_and_the_merged_file_kept(tmp_path, bad):
    """A unit's rejects line that is no record was a bare JSON error (or KeyError) naming no
    file: now its file and line, and the merged file of the last run stays as it was."""
    root = str(tmp_path / "out")
    _finish(root, [2, 3])
    before = open(f"{root}/{mf.REJECTS_NAME}", "rb").read()
    lines = _rejects(1, 3).splitlines(keepends=True)
    storage.write_bytes_atomic(mf.rejects_url(root, 1), lines[0] + bad + b"\n" + lines[2])
    with pytest.raises(ValueError, match=r"^\S+/rejects/000001\.jsonl line 2 is not a reject "
                                         r"record \(.+\): delete \S+/\*/000001\.done\.json to "
                                         r"redo that unit$"):
        _finish(root, [2, 3], write=False)
    assert open(f"{root}/{mf.REJECTS_NAME}", "rb").read() == before


def test_a_rejects_file_without_its_last_newline_is_merged_line_by_line(tmp_path):
    """A unit's file whose last record lacks its newline (written by another tool) ran into the
    next unit's first record: one line holding two records in the merged file."""
    root = str(tmp_path / "out")
    storage.write_bytes_atomic(mf.rejects_url(root, 0), _rejects(0, 2).rstrip(b"\n"))
    storage.write_bytes_atomic(mf.rejects_url(root, 1), _rejects(1, 3))
    summary = _finish(root, [2, 3], write=False)
    merged = open(f"{root}/{mf.REJECTS_NAME}", "rb").read()
    assert merged == _rejects(0, 2) + _rejects(1, 3)
    assert sum(summary["rejects_by_reason"].values()) == 5


def test_a_torn_last_record_is_named_by_file_and_line(tmp_path):
    """The partial last line a killed writer leaves is no record: refused as any malformed line."""
    root = str(tmp_path / "out")
    storage.write_bytes_atomic(mf.rejects_url(root, 0), _rejects(0, 3)[:-40])
    storage.write_bytes_atomic(mf.rejects_url(root, 1), _rejects(1, 1))
    with pytest.raises(ValueError, match=r"/rejects/000000\.jsonl line 3 is not a reject record"):
        _finish(root, [3, 1], write=False)


def test_ignored_icc_profiles_are_summed_per_stage_and_printed(tmp_path, capsys):
    """The units' icc_ignored counts reach the index's shards and totals and the summary line;
    unknown (?) where a marker an earlier bdt wrote has none."""
    root = str(tmp_path / "out")
    summary = _finish(root, [1, 0, 2], icc=[3, 0, 4])
    assert summary["stages"]["32"]["icc_ignored"] == 7
    index = json.loads(open(f"{root}/{mf.INDEX_NAME}").read())
    assert [s["icc_ignored"] for s in index["stages"]["32"]["shards"]] == [3, 0, 4]
    assert "0 upscaled, 7 with an ICC profile ignored" in capsys.readouterr().out
    summary = _finish(root, [1, 0, 2], icc=[3, None, 4])
    assert summary["stages"]["32"]["icc_ignored"] is None
    assert "0 upscaled, ? with an ICC profile ignored" in capsys.readouterr().out
