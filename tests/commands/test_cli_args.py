"""`bdt sample` / `bdt eval` refuse unusable flags and input files with exit 2 and one line naming
the flag or file, before loading any model (so the model path here need not exist)."""

import json
import os
import threading

import pytest

from bdt.cli import main
from bdt.eval.suite import load_suite


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, expected", [
    (["--size", "0"], "bucket '0': expected S or WxH with positive sides"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 0"),
    (["--cfg-scale", "-2"], "--cfg-scale must be a finite number >= 0"),
    (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
    (["--device", "foo"], "--device 'foo': expected auto, cpu or cuda[:N]"),
    (["--device", "meta"], "--device 'meta': expected auto, cpu or cuda[:N]"),
    (["--cols", "0"], "--cols must be >= 1, got 0"),
    (["--out", "FILE"], "is a file; give a directory"),
    (["--prompts-file", "LATIN1"], "latin1.txt: not a UTF-8 text file (byte 5"),
])
def test_sample_refuses_bad_flags_before_loading(tmp_path, capsys, args, expected):
    (tmp_path / "file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("une f\xeate\n".encode("latin-1"))
    subst = {"FILE": str(tmp_path / "file"), "LATIN1": str(tmp_path / "latin1.txt")}
    args = [subst.get(a, a) for a in args]
    source = [] if "--prompts-file" in args else ["--prompt", "a red circle"]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    code = main(["sample", "--model", str(tmp_path / "no_model"), *source, *args, *out])
    last = _last_error(capsys)
    assert code == 2 and last.startswith("bdt sample: error: ") and expected in last, last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lines, expected", [
    (["SAME", "SAME"], ":2: not a suite item (id 'single_object-000' must be unique"),
    (["TRAVERSAL"], ":1: not a suite item (id '../x' must be unique and a plain file name)"),
    (["[1, 2]"], ":1: not a suite item (not a JSON object)"),
    (["NO_PROMPT"], ":1: not a suite item (id, category and prompt must be non-empty strings)"),
    # ids that no image file can be named by: once refused only after every image was generated
    (["NUL_ID"], ":1: not a suite item (id 'a\\x00b' names no image file (images/<id>.png: no NUL"),
    (["LONG_ID"], ":1: not a suite item (id 'aaaaaaaa"),
    (["SURROGATE_ID"], ":1: not a suite item ('utf-8' codec can't encode character '\\ud800'"),
    # the judge lists every wanted object: 10**30 of them exhausted memory after the generation
    (["HUGE_COUNT"], ":1: not a suite item (asks for 10000000000000000000000000000"),
    (["LATIN1"], "suite.jsonl: not a UTF-8 text file"),
    (["[" * 100000 + "]" * 100000], ":1: not a suite item (maximum recursion depth exceeded"),
])
def test_eval_refuses_bad_suite_files(tmp_path, capsys, lines, expected):
    item = load_suite()[0]
    subst = {"SAME": json.dumps(item), "TRAVERSAL": json.dumps({**item, "id": "../x"}),
             "NO_PROMPT": json.dumps({**item, "prompt": None}),
             "NUL_ID": json.dumps({**item, "id": "a\0b"}),
             "LONG_ID": json.dumps({**item, "id": "a" * 252}),  # + ".png": 256 bytes
             "SURROGATE_ID": json.dumps({**item, "id": "a\ud800"}),
             "HUGE_COUNT": json.dumps({**item, "spec": {**item["spec"], "groups": [
                 {**item["spec"]["groups"][0], "count": 10**30}]}})}
    text = "".join(subst.get(line, line) + "\n" for line in lines)
    suite = tmp_path / "suite.jsonl"
    suite.write_bytes(b"\xff\n" if lines == ["LATIN1"] else text.encode())
    code = main(["eval", "--model", str(tmp_path / "no_model"), "--suite", str(suite),
                 "--out", str(tmp_path / "o")])
    last = _last_error(capsys)
    assert code == 2 and last.startswith("bdt eval: error: ") and expected in last, last


def test_prompt_and_suite_lines_end_at_newlines_only(tmp_path):
    """str.splitlines cut a prompt at U+2028 or a form feed into two prompts, and refused a
    suite item whose JSON holds U+2028 unescaped (valid JSON, json.dumps(ensure_ascii=False))."""
    from bdt.commands.eval import _read_suite
    from bdt.commands.sample import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red\u2028circle\r\na blue\x0csquare\n\na star".encode())
    assert read_prompts(str(prompts)) == [(1, "a red\u2028circle"), (2, "a blue\x0csquare"),
                                          (4, "a star")]
    item = {**load_suite()[0], "prompt": "a circle\u2028"}
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _read_suite(str(suite)) == [item]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_prompts_or_suite_file_is_read_up_to_a_bound_and_a_small_fifo_whole(
        tmp_path, capsys, command):
    """`--prompts-file /dev/zero` (or a huge file) was read whole, until memory ran out. A file
    is read up to a bound and refused past it; a FIFO (`<(...)`) below it still works."""
    from bdt.commands.sample import MAX_TEXT_BYTES

    flag = "--prompts-file" if command == "sample" else "--suite"
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: no disk space
    for path in (str(big), "/dev/zero"):
        code = main([command, "--model", str(tmp_path / "no_model"), flag, path,
                     "--out", str(tmp_path / "o")])
        last = _last_error(capsys)
        assert code == 2 and f": error: {path}: larger than 64 MiB" in last, last
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = "a red circle" if command == "sample" else json.dumps(load_suite()[0])
    writer = threading.Thread(target=lambda: fifo.write_text(line + "\n"))
    writer.start()
    code = main([command, "--model", str(tmp_path / "no_model"), flag, str(fifo),
                 "--out", str(tmp_path / "o")])
    writer.join()
    last = _last_error(capsys)  # read it whole: on to the model, which is not there
    assert code == 2 and "no_model' does not exist" in last, last

@pytest.mark.parametrize("action, args, expected", [
    ("encode", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("decode", ["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    ("decode", ["--seed", str(2**70)], "--seed must be in [0, 2^63)"),
    ("decode", ["--bits", "EMPTY"], "empty.npy: holds no token grid (shape [1, 0, 0, 16])"),
])
def test_tokenizer_refuses_bad_flags_and_empty_bits(tmp_path, capsys, action, args, expected):
    import numpy as np

    from testkit import save_tiny_image_tokenizer

    save_tiny_image_tokenizer(str(tmp_path / "tok"), 16)
    np.save(tmp_path / "empty.npy", np.zeros((1, 0, 0, 16), dtype=np.uint8))
    np.save(tmp_path / "bits.npy", np.zeros((1, 2, 2, 16), dtype=np.uint8))
    source = {"encode": ["--images", str(tmp_path / "none.png"), "--out", str(tmp_path / "b.npy")],
              "decode": ["--bits", str(tmp_path / "bits.npy"), "--out", str(tmp_path / "o")]
              }[action]
    args = [str(tmp_path / "empty.npy") if a == "EMPTY" else a for a in args]
    code = main(["tokenizer", action, "--tokenizer", str(tmp_path / "tok"), *source, *args])
    last = _last_error(capsys)
    assert code == 2 and last.startswith("bdt tokenizer: error: ") and expected in last, last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, expected", [
    (["--hidden", "0"], "--hidden must be >= 1, got 0"),
    (["--layers", "0"], "--layers must be >= 1, got 0"),
    (["--max-captions", "0"], "--max-captions must be >= 1, got 0"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
    (["--hidden", "36", "--heads", "4"], "--hidden 36 must be a multiple of 2 x --heads 4"),
])
def test_init_tiny_refuses_sizes_no_model_runs_with(tmp_path, capsys, args, expected):
    code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "no_tars"),
                 "--out", str(tmp_path / "llm"), *args])
    last = _last_error(capsys)
    assert code == 2 and last.startswith("bdt model: error: ") and expected in last, last
    assert not (tmp_path / "llm").exists()
