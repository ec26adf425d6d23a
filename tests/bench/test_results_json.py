"""What the benchmarks write is strict JSON wherever it goes: a value with no definition is null,
never NaN (bench/empty_images.py once wrote NaN for the distance of empty images when a setting
had none: Python reads it back, strict readers stop at it); a new results folder
($BDT_BENCH_RESULTS) is made, not a crash; and every script's default output follows it."""

import json
import math
import os
import subprocess
import sys

import numpy as np

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402  (bench/ is not a package)
import empty_images  # noqa: E402
import extract_throughput  # noqa: E402
import summary  # noqa: E402


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_written_as_null_and_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "new" / "results"))
    with common.Run("probe") as run:
        path = run.write({"a": {"b": [1.5, math.nan]}, "c": -math.inf, "d": np.float64("nan")},
                         goals=[])
    d = strict(open(path).read())
    assert d["results"] == {"a": {"b": [1.5, None]}, "c": None, "d": None}
    assert d["bench"] == "probe" and "flags" in d["machine"] and d["date"]
    out = capsys.readouterr().out
    assert "results.a.b[1] is nan, written as null" in out and "results.c is -inf" in out, out


def test_undefined_means_are_none_not_nan():
    empty = np.array([False, False])
    assert empty_images.mean_where(np.array([1.0, 3.0]), empty) is None
    assert empty_images.mean_where(np.array([1.0, 3.0]), ~empty) == 2.0
    assert extract_throughput.slope_per_1000([250], [514.0]) is None
    assert extract_throughput.slope_per_1000([250, 250], [514.0, 520.0]) is None
    assert extract_throughput.slope_per_1000([1000, 2000], [10.0, 12.0]) == 2.0


def test_summary_makes_a_new_results_folder_and_leaves_the_docs(tmp_path, monkeypatch):
    doc = REPO / "docs" / "results.md"
    before = doc.read_text()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(summary, "RESULTS", str(fresh))
    summary.main()
    assert (fresh / "README.md").read_text().startswith("# Benchmark results")
    assert doc.read_text() == before


def test_tokenizer_quality_output_follows_the_results_folder(tmp_path):
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import tokenizer_quality as t; "
             "print(t.arguments([]).out); print(t.arguments(['--out', 'q.json']).out)")
    done = subprocess.run([sys.executable, "-c", probe, str(REPO / "bench")], cwd=tmp_path,
                          capture_output=True, text=True,
                          env=dict(os.environ, BDT_BENCH_RESULTS=str(tmp_path / "elsewhere")))
    assert done.returncode == 0, done.stderr[-2000:]
    default, bare = done.stdout.split()
    assert default == str(tmp_path / "elsewhere" / "tokenizer_quality.json")
    assert bare == str(tmp_path / "q.json")  # its grids' folder: tmp_path, not ""


def _tokenizer_result(psnr: float, bits_outside: int) -> dict:
    ev = {"psnr_db": psnr, "bit_rate_min": 0.31, "bit_rate_max": 0.69,
          "bits_outside_5_95": bits_outside}
    return {"at_fixed_steps": {"steps": 400, "eval_128px": {**ev, "psnr_db": psnr - 3}},
            "at_time_budget": {"steps": 2255, "wall_min": 8.07, "eval_128px": ev,
                               "judge": {"size_px": 64, "originals": {"overall": 1.0},
                                         "reconstructions": {"overall": 0.7}}}}


def test_tokenizer_quality_goals_reach_the_summary_table(tmp_path, monkeypatch):
    """The tokenizer's PSNR goal (issue 3) was in no table: its JSON had no `goals`."""
    import tokenizer_quality
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path))
    for psnr, bits_outside, verdicts in ((21.5, 0, ["**no**", "yes"]), (28.4, 2, ["yes", "**no**"])):
        with common.Run("tokenizer_quality") as run:
            result = _tokenizer_result(psnr, bits_outside)
            common.write_json(str(tmp_path / "tokenizer_quality.json"),
                              {**run.stamp(), **result,
                               "goals": tokenizer_quality.quality_goals(result)})
        summary.main()
        rows = [r for r in (tmp_path / "README.md").read_text().splitlines() if "tokenizer" in r]
        assert len(rows) == 3, rows
        assert [r.split(" | ")[3] for r in rows[:2]] == verdicts, rows
        assert f"{psnr:.1f} dB after 2255 steps" in rows[0] and "overall 0.70" in rows[2]
