"""bench/summary.py: a result file that is torn or of another shape is named and left out; the
others still make the table (one bad file once stopped the whole summary with a traceback)."""

import json
import subprocess
import sys

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import summary  # noqa: E402  (bench/ is not a package)


def test_bad_result_files_are_named_and_left_out(tmp_path, monkeypatch, capsys):
    goal = {"goal": "g", "value": 1, "target": ">= 1", "met": True, "limit": ""}
    files = {"decode_speed": '{"goals": [{"goal": "g"',  # torn
             "train_throughput": "[]",
             "data_path": json.dumps({"goals": [{"goal": "g", "value": 1}]}),  # no 'limit'
             "zero_memory": json.dumps({"goals": [goal]})}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path))
    assert [name for name, _ in summary.load_all()] == ["zero_memory"]
    out = capsys.readouterr().out
    for name, why in (("decode_speed", "not JSON"), ("train_throughput", "holds a list"),
                      ("data_path", "'goals' is not a list of")):
        assert f"{name}.json: left out of the table: {why}" in out, out


def test_help_prints_usage_and_writes_nothing():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "summary.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO / "bench")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "| goal |" not in proc.stdout
