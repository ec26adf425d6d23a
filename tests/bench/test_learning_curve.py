"""bench/learning_curve.py: in-loop points carry the FLOPs logged on their step, final points
average the eval reports of their seeds, and the x axis is in units of the 1x run's FLOPs."""

import json
import sys

import pytest

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import learning_curve  # noqa: E402  (bench/ is not a package)


def write_run(path, records, per_category=0):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(f"eval:\n  per_category: {per_category}\n  categories: []\n")
    return str(path)


def write_eval(path, overall, single, color, seed=None, per_category=40):
    path.mkdir()
    (path / "eval.json").write_text(json.dumps({
        "overall": overall, "per_category": {"single_object": single, "colors": 0.1},
        "per_attribute": {"color": color, "count": 0.5},
        "counts": dict.fromkeys(learning_curve.CATEGORIES, per_category),
        "seed": int(path.name[-1]) if seed is None else seed, "width": 64, "height": 64,
        "steps": 12, "cfg_scale": 2.0}))
    return str(path)


def test_points_table_and_picture(tmp_path, capsys):
    unit = write_run(tmp_path / "unit", [{"step": 10, "loss": 1.0, "flops_seen": 1e9},
                                         {"step": 20, "loss": 0.9, "flops_seen": 2e9}])
    curve = write_run(tmp_path / "curve", [
        {"step": 10, "loss": 1.0, "flops_seen": 1e9},
        {"step": 10, "eval_overall": 0.1, "eval/single_object": 0.3, "eval_attr/shape": 0.2},
        {"step": 30, "loss": 0.8, "flops_seen": 6e9},
        {"step": 30, "eval_overall": 0.4, "eval/single_object": 0.7, "eval_attr/shape": 0.6}])
    evals = [write_eval(tmp_path / "s0", 0.2, 0.4, 0.3), write_eval(tmp_path / "s1", 0.4, 0.6, 0.5)]
    out = str(tmp_path / "lc")
    learning_curve.main(["--series", "curve", curve, "--final", "unit run", unit, *evals,
                         "--unit-flops", unit, "--out", out])
    data = json.loads((tmp_path / "lc.json").read_text())
    assert data["unit_flops"] == 2e9
    in_loop, final = data["series"]
    assert [(p["step"], p["flops"], p["overall"]) for p in in_loop["points"]] == [
        (10, 1e9, 0.1), (30, 6e9, 0.4)]
    assert in_loop["points"][1]["per_attribute"] == {"shape": 0.6}
    [end] = final["points"]
    assert (end["step"], end["flops"], end["seeds"]) == (20, 2e9, 2)
    assert end["overall"] == pytest.approx(0.3) and end["overall_per_seed"] == [0.2, 0.4]
    assert end["per_category"]["single_object"] == pytest.approx(0.5)
    assert end["per_attribute"]["color"] == pytest.approx(0.4)
    table = capsys.readouterr().out
    assert "| curve | 30 | 3.00 | 1 | 0.400 | 0.700 |" in table
    assert (tmp_path / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # later points join the stored curve in its unit; a series named again is replaced
    gpu = write_run(tmp_path / "gpu", [{"step": 5, "loss": 0.5, "flops_seen": 4e10}])
    again = write_run(tmp_path / "again", [
        {"step": 10, "flops_seen": 1e9}, {"step": 10, "eval_overall": 0.2}])
    learning_curve.main(["--add-to", out + ".json", "--final", "gpu", gpu, evals[0],
                         "--series", "curve", again, "--out", out + "2"])
    merged = json.loads((tmp_path / "lc2.json").read_text())
    assert merged["unit_flops"] == 2e9
    assert [(s["name"], len(s["points"])) for s in merged["series"]] == [
        ("unit run", 1), ("curve", 1), ("gpu", 1)]
    assert "| gpu | 5 | 20.00 | 1 | 0.200 | 0.400 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        learning_curve.main(["--final", "gpu", gpu, evals[0], "--out", out + "3"])


def test_eval_on_a_step_without_flops_is_refused(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 10, "loss": 1.0, "flops_seen": 1e9},
                                       {"step": 15, "eval_overall": 0.1}])
    with pytest.raises(ValueError, match="evaluation at step 15 but no flops_seen"):
        learning_curve.in_loop_points(run)


def test_a_torn_last_line_is_left_out_and_a_bad_line_elsewhere_named(tmp_path):
    """A run killed mid-write (or still writing) leaves a torn last line: once a bare traceback."""
    run = write_run(tmp_path / "run", [{"step": 10, "flops_seen": 1e9},
                                       {"step": 10, "eval_overall": 0.1}])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "flops_se')
    assert [p["step"] for p in learning_curve.in_loop_points(run)] == [10]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 30}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        learning_curve.in_loop_points(run)


@pytest.mark.parametrize("line", ["[" * 100_000, "1", '{"step": "ten"}'])
def test_a_garbled_line_is_named_not_a_traceback(tmp_path, line):
    """A line the trainer's resume keeps (it cuts only records with a step) that is deep garbage
    or JSON but no record raised a bare RecursionError or TypeError from inside the reader."""
    run = write_run(tmp_path / "run", [{"step": 10, "flops_seen": 1e9}])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(line + '\n{"step": 20, "flops_seen": 2e9}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        learning_curve.final_flops(run)


def test_a_missing_metrics_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"run/metrics.jsonl: no such file"):
        learning_curve.final_flops(str(tmp_path / "run"))


@pytest.mark.parametrize("case, named", [
    ("part of the suite in the loop", r"config.yaml: eval.per_category = 2"),
    ("part of the suite at the end", r"eval.json: scores .* not the whole suite"),
    ("one seed twice", r"sampling seeds \[0, 0\]"),
    ("NaN score", r"eval_overall.*|NaN or inf"),
    ("no evaluation", r"holds no in-loop evaluation"),
])
def test_points_that_are_not_what_the_curve_plots_are_refused_and_nothing_written(tmp_path, case,
                                                                                  named):
    """These were taken silently (a subset's score beside whole-suite ones, one seed counted
    twice), or crashed after the JSON was written, replacing an --add-to curve."""
    good = [{"step": 10, "flops_seen": 1e9}, {"step": 10, "eval_overall": 0.1}]
    run = write_run(tmp_path / "run", {"no evaluation": good[:1],
                                       "NaN score": [good[0], {"step": 10,
                                                               "eval_overall": float("nan")}]
                                       }.get(case, good),
                    per_category=2 if case == "part of the suite in the loop" else 0)
    evals = [write_eval(tmp_path / "s0", 0.2, 0.4, 0.3,
                        per_category=5 if case == "part of the suite at the end" else 40),
             write_eval(tmp_path / "s1", 0.2, 0.4, 0.3,
                        seed=0 if case == "one seed twice" else None)]
    with pytest.raises(ValueError, match=named):
        learning_curve.main(["--series", "curve", run, "--final", "end", run, *evals,
                             "--unit-flops", run, "--out", str(tmp_path / "lc")])
    assert not list(tmp_path.glob("lc*"))


def write_token_noise(path, overall, single, px=64):
    """A bench/token_noise.py result as it writes one: the stamp around its results."""
    rows = {"0.0": {"overall": overall, "per_category": {"single_object": single}},
            "0.08": {"overall": overall / 2, "per_category": {"single_object": single / 2}}}
    path.write_text(json.dumps({"bench": "token_noise", "date": "2026-12-08 01:00 UTC",
                                "machine": {"cpu": "a CPU"}, "goals": [], "results": {
                                    "tokenizer": "demo/tokenizer/export", "num": 240, "px": px,
                                    "reconstructions_by_flip_rate": rows}}))
    return str(path)


def test_the_tokenizers_bound_is_drawn_printed_and_kept_by_add_to(tmp_path, capsys):
    run = write_run(tmp_path / "run", [{"step": 10, "flops_seen": 1e9},
                                       {"step": 10, "eval_overall": 0.1}])
    noise = write_token_noise(tmp_path / "tn.json", 0.73, 0.98)
    out = str(tmp_path / "lc")
    learning_curve.main(["--series", "curve", run, "--unit-flops", run, "--ceiling", noise,
                         "--out", out])
    ceiling = json.loads((tmp_path / "lc.json").read_text())["ceiling"]
    assert (ceiling["overall"], ceiling["per_category"], ceiling["px"]) == (
        0.73, {"single_object": 0.98}, 64)  # the unflipped row, not the 8% one
    assert (ceiling["date"], ceiling["machine"]) == ("2026-12-08 01:00 UTC", "a CPU")
    assert "| the tokenizer's reconstructions (64 px; the bound) | - | - | - | 0.730 | 0.980 |" \
        in capsys.readouterr().out
    learning_curve.main(["--add-to", out + ".json", "--series", "again", run, "--out", out + "2"])
    assert json.loads((tmp_path / "lc2.json").read_text())["ceiling"] == ceiling
    newer = write_token_noise(tmp_path / "tn2.json", 0.93, 0.98, px=128)
    learning_curve.main(["--add-to", out + ".json", "--ceiling", newer, "--out", out + "3"])
    assert json.loads((tmp_path / "lc3.json").read_text())["ceiling"]["px"] == 128


@pytest.mark.parametrize("result", [
    {"bench": "token_noise"},  # no results
    {"results": {"px": 64, "reconstructions_by_flip_rate": {"0.08": {"overall": 0.5}}}},
    {"results": {"px": 64, "reconstructions_by_flip_rate": {"0.0": {"overall": "NaN",
                                                                     "per_category": {}}}}},
])
def test_a_bound_from_another_file_is_named_and_nothing_written(tmp_path, result):
    run = write_run(tmp_path / "run", [{"step": 10, "flops_seen": 1e9},
                                       {"step": 10, "eval_overall": 0.1}])
    (tmp_path / "tn.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"tn.json: (not a bench/token_noise.py result|overall)"):
        learning_curve.main(["--series", "curve", run, "--unit-flops", run, "--ceiling",
                             str(tmp_path / "tn.json"), "--out", str(tmp_path / "lc")])
    assert not list(tmp_path.glob("lc*"))
