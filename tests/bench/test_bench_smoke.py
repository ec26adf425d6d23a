"""The quick scripts of `make bench` run to the end at their smallest sizes, print their table and
write a result that bench/summary.py takes: strict JSON (no NaN) naming its date and machine. Most of bench/ had no test, and the code under them
changes: a script could stop working and nobody would see it until the next `make bench`."""

import json
import os
import subprocess
import sys

import pytest

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import summary  # noqa: E402  (bench/ is not a package)

# The model-size flags of the scripts that build the ~100M model (bench/common.add_model_args).
TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
              "--intermediate", "64", "--head-width", "64", "--head-depth", "1"]
# name: (its smallest sizes, a column of the table it prints)
TINY = {"decode_speed": (["--grid", "4", "--head-steps", "2", "--rounds", "1", "--cache-grids", "4"],
                         "speedup vs P=1"),
        "data_path": (["--batches", "3", "--samples", "60"], "efficiency"),
        "checkpoint_hash": (["--width", "64", "--layers", "1", "--repeats", "1"],
                            "vs DeepSpeed alone"),
        "train_throughput": (["--steps", "1", "--budget", "256", "--size", "32", *TINY_MODEL,
                              "--peak-n", "64", "--peak-seconds", "0.05"], "tokens/s"),
        "zero_memory": (["--stages", "3", *TINY_MODEL], "params+opt MB"),
        "data_prefetch": (["--rows", "2", "--producer-rows", "2", "--samples", "40",
                           "--rate", "2000000"], "data_wait_frac"),
        "resume_cost": (["--steps", "2"], "to first step s"),
        # One size: no slope of memory against it (null, once NaN), but the ratio's goal.
        "extract_throughput": (["--sizes", "20", "--bare-max", "20", "--cpus", "1"],
                               "pipeline img/s")}


def run_bench(name: str, args: list[str], results) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, BDT_BENCH_RESULTS=str(results)))


def strict_json(text: str):
    """json.loads that refuses NaN and infinities (Python's takes them; strict readers do not)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_script_runs_and_its_result_reaches_the_summary(name, tmp_path, monkeypatch):
    args, column = TINY[name]
    done = run_bench(name, args, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert column in done.stdout, done.stdout[-2000:]
    d = strict_json((tmp_path / f"{name}.json").read_text())
    goals = d.get("goals") or summary.extraction_goals(d)  # the one layout of its own
    assert d["bench"] == name and goals
    assert d["date"] and "flags" in d["machine"]  # the summary's row names when and where
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path))
    assert [n for n, _ in summary.load_all()] == [name]


@pytest.mark.slow
def test_tokenizer_quality_names_its_date_and_machine(tmp_path):
    """It wrote its own layout with no stamp: nothing said when or on what its numbers were made."""
    done = run_bench("tokenizer_quality", ["--minutes", "0", "--fixed-steps", "1", "--ranks", "1",
                                           "--train-num", "4", "--eval-num", "2", "--judge-num",
                                           "1", "--work", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    d = strict_json((tmp_path / "tokenizer_quality.json").read_text())
    assert d["bench"] == "tokenizer_quality" and d["date"] and "flags" in d["machine"]
    assert d["at_fixed_steps"]["steps"] == 1 and "goal_met" in d  # its own layout, as before


@pytest.mark.parametrize("name, args, why", [
    ("data_prefetch", ["--samples", "0"], "--samples and --rate must be > 0"),
    ("resume_cost", ["--steps", "1"], "--steps must be >= 2, got 1")])
def test_sizes_too_small_are_refused_in_one_line(name, args, why, tmp_path):
    done = run_bench(name, args, tmp_path)
    assert done.returncode == 2 and why in done.stderr.splitlines()[-1], done.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # nothing written
