"""trainutil.rank_entry, which every spawned rank of the tests runs under: a rank that returned
passes even when the interpreter's teardown aborts afterwards (the rare "terminate called
without an active exception" after destroy_process_group), its output flushed; a rank that
raised still fails the spawn with its traceback, and an exit code still comes through."""

from __future__ import annotations

import atexit
import os
import sys

import pytest
import torch.multiprocessing as mp

from trainutil import rank_entry

pytestmark = pytest.mark.slow  # each test spawns ranks


def _finish(rank: int, fail_on: int, how: str) -> None:
    if how != "exit":
        atexit.register(os.abort)  # stands for the C++ teardown abort at interpreter exit
    sys.stdout.reconfigure(line_buffering=False, write_through=False)  # as when not a tty
    print(f"rank {rank} finished")  # still buffered when the rank ends
    if rank == fail_on:
        if how == "raise":
            raise ValueError(f"rank {rank} broke")
        sys.exit(2)


@rank_entry
def _rank(rank: int, fail_on: int, how: str) -> None:
    _finish(rank, fail_on, how)


def test_a_finished_rank_passes_despite_a_teardown_abort(capfd):
    mp.spawn(_rank, args=(-1, ""), nprocs=2)
    out = capfd.readouterr().out
    assert "rank 0 finished" in out and "rank 1 finished" in out


def test_without_it_the_teardown_abort_fails_the_spawn():
    with pytest.raises(mp.ProcessExitedException, match="signal SIGABRT"):
        mp.spawn(_finish, args=(-1, ""), nprocs=1)


def test_a_rank_that_raised_fails_with_its_traceback():
    with pytest.raises(mp.ProcessRaisedException, match=r"(?s)in _finish.*ValueError: rank 1 "
                                                        r"broke"):
        mp.spawn(_rank, args=(1, "raise"), nprocs=2)


def test_a_rank_that_exited_keeps_its_exit_code():
    """bdt's entry points report a bad config by exiting 2; spawn_train returns that code."""
    with pytest.raises(mp.ProcessExitedException) as failed:
        mp.spawn(_rank, args=(0, "exit"), nprocs=1)
    assert failed.value.exit_code == 2


def test_called_in_this_process_it_returns():
    calls = []
    assert rank_entry(calls.append)(1) is None and calls == [1]
