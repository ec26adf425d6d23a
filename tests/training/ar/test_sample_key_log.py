"""The consumed-sample log on a resume: the steps a killed launch logged past the checkpoint are
trained again, so their records go, also from the files of ranks a smaller world lost."""

import json

from bdt.training.ar.reshard import SampleKeyLog


def write(run_dir, rank, world, steps):
    log = SampleKeyLog(str(run_dir), rank, world, keep_through_step=-1)
    for step in steps:
        log.add(step, [f"r{rank}s{step}"])
    log.close()


def steps_in(run_dir, rank):
    path = run_dir / "sample_keys" / f"rank_{rank:05d}.jsonl"
    return [json.loads(line)["step"] for line in open(path)]


def test_a_resume_cuts_every_rank_file_back_to_its_step(tmp_path):
    for rank in range(3):  # a 3-rank launch killed during step 5
        write(tmp_path, rank, 3, range(1, 6))
    with open(tmp_path / "sample_keys" / "rank_00001.jsonl", "a") as f:
        f.write('{"step": 6, "ra')  # torn mid-record
    # resumed on 2 ranks from the checkpoint of step 3: rank 0 opens first and cuts rank 2's file
    logs = [SampleKeyLog(str(tmp_path), rank, 2, keep_through_step=3) for rank in range(2)]
    for log in logs:
        log.add(4, ["again"])
        log.close()
    assert steps_in(tmp_path, 0) == steps_in(tmp_path, 1) == [1, 2, 3, 4]
    assert steps_in(tmp_path, 2) == [1, 2, 3]


def test_a_fresh_start_keeps_no_record_of_an_attempt_without_checkpoint(tmp_path):
    write(tmp_path, 0, 1, range(1, 3))
    write(tmp_path, 0, 1, range(1, 4))
    assert steps_in(tmp_path, 0) == [1, 2, 3]
