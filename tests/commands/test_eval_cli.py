"""`bdt eval` on a tiny trained run (report files, counts, verdicts that re-judge the same), the
in-loop `evaluate()` API, the scoring path on ground-truth renders, and bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from bdt.cli import main
from bdt.data.shapes import layout, render
from bdt.eval.judge import judge_image
from bdt.eval.run import evaluate, judge_items, select, write_report
from bdt.eval.suite import load_suite
from bdt.generation.grid import FAIL_RGB, PASS_RGB
from bdt.generation.sampling import SamplingConfig
from evalutil import BUCKET


@pytest.mark.slow
def test_eval_subset_writes_report_that_rejudges_the_same(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    export = os.path.join(trained_run, "export")
    code = main(["eval", "--model", export, "--categories", "counting", "position",
                 "--per-category", "3", "--size", str(BUCKET[0]), "--steps", "2", "--batch", "4",
                 "--out", str(out)])
    assert code == 0
    assert "| counting |" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["counts"] == {"counting": 3, "position": 3}
    assert set(result["per_category"]) == {"counting", "position"}
    assert result["num_images"] == 6 and result["images_per_s"] > 0
    suite_ids = [i["id"] for i in select(load_suite(), ["counting", "position"], 3)]
    assert [i["id"] for i in result["items"]] == suite_ids
    specs = {i["id"]: i["spec"] for i in load_suite()}
    for item in result["items"]:
        image = Image.open(out / item["file"])
        assert image.size == BUCKET
        verdict = judge_image(image, specs[item["id"]])
        assert (verdict.passed, verdict.reason) == (item["passed"], item["reason"])
    per = {c: np.mean([i["passed"] for i in result["items"] if i["category"] == c])
           for c in ("counting", "position")}
    assert result["per_category"] == pytest.approx(per)
    assert result["overall"] == pytest.approx(np.mean(list(per.values())))
    md = (out / "eval.md").read_text()
    assert "| position |" in md and "images/s" in md
    assert Image.open(out / "grid.png").size == (6 * (16 + 4) + 4, 16 + 8)

    # A second report would mix with the first one's images: refused before the model loads,
    # unless --overwrite (which replaces the report's files).
    again = ["eval", "--model", export, "--categories", "counting", "--per-category", "1",
             "--size", str(BUCKET[0]), "--steps", "2", "--out", str(out)]
    assert main(again) == 2 and "is not empty" in capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text())["num_images"] == 6
    assert main([*again, "--overwrite"]) == 0
    assert json.loads((out / "eval.json").read_text())["num_images"] == 1
    capsys.readouterr()

    # The in-loop API on live modules gives the same verdicts (same seeds and batches).
    from bdt.model.ar import BitDanceModel
    from bdt.tokenizer.io import load_tokenizer

    model = BitDanceModel.from_pretrained(export)
    decoder = load_tokenizer(os.path.join(export, "image_tokenizer"))
    items = select(load_suite(), ["counting", "position"], 3)
    live = evaluate(model, decoder, items, *BUCKET, SamplingConfig(cfg_scale=4.0, num_steps=2),
                    batch=4)
    assert [i["passed"] for i in live["items"]] == [i["passed"] for i in result["items"]]
    assert live["counts"] == result["counts"]


def _ground_truth(items: list[dict], size: int = 128) -> list[Image.Image]:
    images = []
    for i, item in enumerate(items):
        rng = np.random.default_rng([7, i])
        images.append(render(rng, layout(rng, item["spec"], size, size), size, size)[0])
    return images


def test_scoring_passes_ground_truth_and_fails_wrong_prompts(tmp_path):
    items = select(load_suite(), per_category=3)
    images = _ground_truth(items)
    right = judge_items(items, images)
    assert right["overall"] == 1.0 and all(i["passed"] for i in right["items"])
    assert right["counts"] == {c: 3 for c in right["counts"]} and len(right["counts"]) == 6
    # Every image judged against the next item's prompt: the specs differ, so nearly all fail.
    wrong = judge_items(items, images[1:] + images[:1])
    assert wrong["overall"] < 0.2
    # The grid frames each image by its verdict: green for passed, red for failed.
    mixed = judge_items(items[:2], [images[0], images[0]])
    assert [i["passed"] for i in mixed["items"]] == [True, False]
    write_report(mixed, [images[0], images[0]], str(tmp_path / "r"))
    grid = np.asarray(Image.open(tmp_path / "r" / "grid.png"))
    assert tuple(grid[4 - 1, 4 + 64]) == PASS_RGB  # frame just above cell 0
    assert tuple(grid[4 - 1, 4 + 132 + 64]) == FAIL_RGB  # and above cell 1
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["items"][1]["passed"] is False
    # eval.json means "complete": a report that fails while being written leaves none, not half
    # (json.dump had written the items before it met the bad value)
    broken = dict(mixed, not_json=object())
    with pytest.raises(TypeError):
        write_report(broken, [images[0], images[0]], str(tmp_path / "torn"))
    assert not (tmp_path / "torn" / "eval.json").exists()


@pytest.mark.parametrize("args, expected", [
    (["--categories", "spirals"], "unknown categories ['spirals']"),
    (["--suite", "EMPTY"], "holds no item"),
    (["--suite", "BAD"], ":1: not a suite item"),
    # scored under one category, judged by another's rules (once accepted)
    (["--suite", "MISMATCH"], "category 'nonsense' is not its spec's ('single_object')"),
    # once "prompt 1", its 0-based place among the selected items
    (["--suite", "LONG", "--size", "16"], "suite item 'long': 60"),
])
@pytest.mark.slow
def test_bad_eval_input_exits_2(trained_run, tmp_path, capsys, args, expected):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "prompt": "a circle"}) + "\n")
    spec = {"category": "single_object", "relation": None,
            "groups": [{"shape": "circle", "color": None, "count": 1}]}
    (tmp_path / "mismatch.jsonl").write_text(json.dumps(
        {"id": "x", "category": "nonsense", "prompt": "a circle", "spec": spec}) + "\n")
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(
        {"id": i, "category": "single_object", "prompt": p, "spec": spec}) + "\n"
        for i, p in (("short", "a circle"), ("long", "red " * 600))))
    args = [{"EMPTY": str(tmp_path / "empty.jsonl"), "BAD": str(tmp_path / "bad.jsonl"),
             "MISMATCH": str(tmp_path / "mismatch.jsonl"),
             "LONG": str(tmp_path / "long.jsonl")}.get(a, a) for a in args]
    code = main(["eval", "--model", os.path.join(trained_run, "export"), *args,
                 "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("bdt eval: error: ") and expected in last, last
