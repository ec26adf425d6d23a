"""The quick scripts of `make bench` run to the end at their smallest sizes, print their table and
write a result that bench/summary.py takes. Most of bench/ had no test, and the code under them
changes: a script could stop working and nobody would see it until the next `make bench`."""

import json
import os
import subprocess
import sys

import pytest

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import summary  # noqa: E402  (bench/ is not a package)

# name: (its smallest sizes, a column of the table it prints)
TINY = {"decode_speed": (["--grid", "4", "--head-steps", "2", "--rounds", "1", "--cache-grids", "4"],
                         "speedup vs P=1"),
        "data_path": (["--batches", "3", "--samples", "60"], "efficiency"),
        "checkpoint_hash": (["--width", "64", "--layers", "1", "--repeats", "1"],
                            "vs DeepSpeed alone")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_script_runs_and_its_result_reaches_the_summary(name, tmp_path, monkeypatch):
    args, column = TINY[name]
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, BDT_BENCH_RESULTS=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert column in done.stdout, done.stdout[-2000:]
    d = json.loads((tmp_path / f"{name}.json").read_text())
    assert d["bench"] == name and d["goals"]
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path))
    assert [n for n, _ in summary.load_all()] == [name]
