"""The actor pool against what the Ray cluster can place (a local Ray of 2 CPUs, no GPU)."""

from __future__ import annotations

import os
import threading

import pytest
from extract_rawdata import good_samples, write_tar

from bdt.config import load
from bdt.extract.config import ExtractConfig
from bdt.extract.run import run

pytestmark = pytest.mark.slow


def _cfg(tmp_path, tokenizer: str, *extra: str) -> ExtractConfig:
    for i in range(3):
        write_tar(str(tmp_path / f"in-{i}.tar"), good_samples(f"s{i}_", 2, 10 * i))
    return load(ExtractConfig, [], [f"inputs={tmp_path}/in-{{0..2}}.tar", f"output={tmp_path}/out",
                                    f"tokenizer={tokenizer}", "stages=[{resolution: 32}]", "min_side=16",
                                    "batch_size=4", "progress_interval_s=0.5", *extra])


@pytest.mark.parametrize("extra,asked,can", [
    (["num_actors=3", "cpus_per_actor=1"], "3 actor", "can host 2"),
    (["num_actors=1", "cpus_per_actor=3"], "1 actor", "can host 0"),
    (["gpus_per_actor=1"], "1 actor", "can host 0"),  # auto mode on a cluster without GPUs
    (["num_actors=8", "cpus_per_actor=1"], r"3 actor\(s\) \(8 asked, 3 unit\(s\)\)", "can host 2"),
])
def test_more_actors_than_the_cluster_can_place_are_refused_by_name(tmp_path, tiny_tokenizer, ray_local,
                                                                    extra, asked, can):
    """Units bound to actors Ray could never place waited forever: the driver hung silently."""
    with pytest.raises(ValueError, match=rf"num_actors: {asked}.*\(2 CPUs, 0 GPUs\) {can}"):
        run(_cfg(tmp_path, tiny_tokenizer, *extra))


def test_num_actors_above_the_units_asks_only_for_one_per_unit(tmp_path, tiny_tokenizer, ray_local):
    """A 1-unit job asking 3 actors on a cluster hosting 2 was refused, though it needs one."""
    summary = run(_cfg(tmp_path, tiny_tokenizer, "num_actors=3", "cpus_per_actor=1",
                       f"inputs={tmp_path}/in-0.tar"))
    assert summary["done_units"] == 1 and not summary["failed_units"]


def test_units_go_only_to_actors_that_started(tmp_path, tiny_tokenizer, ray_local):
    """Another job holds one of the 2 CPUs: the second actor cannot start, and its units must
    not wait for it while the first actor could do them."""
    ray = ray_local
    blocker = ray.remote(num_cpus=1)(type("Hold", (), {"ping": lambda self: 1})).remote()
    ray.get(blocker.ping.remote())
    cfg = _cfg(tmp_path, tiny_tokenizer, "num_actors=2", "cpus_per_actor=1")
    summary: dict = {}
    job = threading.Thread(target=lambda: summary.update(run(cfg)), daemon=True)
    job.start()
    job.join(timeout=120)
    finished = not job.is_alive()
    ray.kill(blocker)  # lets a hung run end, so a failure here does not hang the module
    job.join(timeout=120)
    assert finished, "the run waited for an actor that could not start"
    assert summary["done_units"] == 3 and not summary["failed_units"]


def test_the_tests_ray_keeps_its_files_under_pytests_temp_dir(ray_local, ray_files_in_pytest_tmp):
    """Each start left a session folder of logs in /tmp/ray (1.4 GB after a day of test runs)."""
    if ray_files_in_pytest_tmp is None:
        pytest.skip("RAY_TMPDIR given, or Ray's socket paths under pytest's temp dir too long")
    session = ray_local._private.worker._global_node.get_session_dir_path()
    assert session.startswith(os.path.join(ray_files_in_pytest_tmp, "ray", "session_"))
