"""A resumed run's metrics log reads like the uninterrupted run's: what an earlier try logged
past the step the run continues from is cut from metrics.jsonl and hidden in TensorBoard."""

import json
import os

import pytest

from bdt.training.metrics import MetricsLogger, open_line_log

EARLIER = [{"step": 0, "params": 10},
           {"step": 1, "loss": 3.0},
           {"note": "no step"},  # not on the step axis: kept wherever it is
           {"step": 2, "loss": 2.5},
           {"step": 2, "eval_overall": 0.1},
           {"step": 3, "loss": 2.0},
           {"step": 4, "loss": 1.5}]


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_cuts_the_records_past_its_step_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, EARLIER, tail='{"step": 5, "lo')  # a kill mid-write
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, keep_through_step=2)
    log.log(3, {"loss": 1.9})
    log.close()
    got = [{k: v for k, v in r.items() if k != "time"} for r in _read(path)]
    assert got == EARLIER[:5] + [{"step": 3, "loss": 1.9}]


def test_fresh_start_in_an_old_run_dir_drops_every_step_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, EARLIER)
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, keep_through_step=-1)
    log.log(0, {"params": 11})
    log.close()
    assert [{k: v for k, v in r.items() if k != "time"} for r in _read(path)] == \
        [{"note": "no step"}, {"step": 0, "params": 11}]


def test_unparsable_lines_inside_and_a_whole_unterminated_last_record_are_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 2}')
    MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, keep_through_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 2}\n'


def test_garbage_nested_past_the_parser_is_no_crash(tmp_path):
    """A line of thousands of '[' (binary garbage, a bad edit) raised RecursionError on every
    resume: the run could not start again until the file was fixed by hand."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n' + "[" * 100_000 + '\n{"step": 3, "loss": 3}\n'
                    + "[" * 100_000)  # the same, torn at the end
    MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, keep_through_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 1}\n' + "[" * 100_000 + "\n"


@pytest.mark.parametrize("before, after", [
    (b'{"a": 1}\n{"a": 2', b'{"a": 1}\n'),  # torn mid-record
    (b'{"a": 1', b""),  # no whole line at all
    (b'{"a": 1}\n' + b"x" * 200_000, b'{"a": 1}\n'),  # a torn tail longer than one read
    (b'{"a": 1}\n', b'{"a": 1}\n'),  # whole: untouched
    (b"", b"")])
def test_a_line_log_is_appended_at_a_line_boundary(tmp_path, before, after):
    """Appending to a log a kill or a full disk left torn joined the next record to the torn
    one (resume.jsonl, the sample-key logs): one line no reader can parse, a record lost."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(before)
    with open_line_log(str(path)) as f:
        f.write('{"a": 3}\n')
    assert path.read_bytes() == after + b'{"a": 3}\n'


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_line_log_that_is_no_file_is_named(tmp_path, kind):
    """A FIFO in a log's place raised an unnamed "not seekable" error (a directory, at least,
    named itself): both now say which path is wrong."""
    path = tmp_path / "log.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(OSError, match=f"{path}: not a regular file"):
        open_line_log(str(path))


def test_a_failed_cut_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write(path, EARLIER)
    before = path.read_bytes()

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, keep_through_step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temp file left either


def test_non_main_rank_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, EARLIER)
    MetricsLogger(str(tmp_path), enabled=False, keep_through_step=-1).close()
    assert _read(path) == EARLIER


def test_tensorboard_hides_the_replaced_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(str(tmp_path), enabled=True, keep_through_step=-1)
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(str(tmp_path), enabled=True, keep_through_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_tensorboard_drops_a_partial_window_the_jsonl_drops(tmp_path):
    """Stopped at step 3 inside a log window: the resume cut the partial record at 3 from the
    JSONL, but TensorBoard (purged from step 4) still showed it, a point the uninterrupted run
    has not; what the JSONL keeps at step 3 (an evaluation) stays in both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(str(tmp_path), enabled=True, keep_through_step=-1)
    first.log(2, {"loss": 2.0})
    first.log(3, {"loss": 3.0, "window_partial": 1})
    first.log(3, {"eval_overall": 0.5})
    first.close()
    resumed = MetricsLogger(str(tmp_path), enabled=True, keep_through_step=3)
    resumed.log(4, {"loss": 4.0})
    resumed.close()
    assert [r.get("loss") for r in _read(tmp_path / "metrics.jsonl")] == [2.0, None, 4.0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 2.0), (4, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval_overall")] == [(3, 0.5)]
    assert "window_partial" not in events.Tags()["scalars"] or \
        [e.step for e in events.Scalars("window_partial")] == []
