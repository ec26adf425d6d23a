"""patient_barrier: a barrier met on the rendezvous store, for the parts of a run that some ranks
do alone for longer than the process group's timeout (a checkpoint conversion, a node's upload),
with a heartbeat per rank so that one that stopped on another node ends the wait."""

from __future__ import annotations

import itertools
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PATIENT_WAIT = timedelta(hours=24)  # a bound that only a rank hung in its own part reaches
# Each rank beats on the store every PATIENT_BEAT_S from a thread; a rank that has not reached
# the barrier and is silent for PATIENT_SILENT_BEATS beats is gone (raised, killed, its node lost).
PATIENT_BEAT_S, PATIENT_SILENT_BEATS = 30.0, 10
_patient: dict = {}  # this process group's namespace on the store and count of patient barriers


class RankGone(RuntimeError):
    """Another rank stopped (raised, killed, its node lost) before it reached the barrier."""


def open_patient_barriers() -> None:
    """Collective (init_distributed calls it): a namespace on the store of its own for this
    process group's patient barriers, and this rank's heartbeat in it. A launcher that restarts
    the ranks (torchrun --max-restarts, an elastic membership change) keeps its store, and the
    keys of the attempt before opened the new attempt's barriers at once."""
    _stop_heartbeat()  # an earlier process group's
    box = [os.urandom(8).hex()]
    dist.broadcast_object_list(box, src=0)
    prefix = f"bdt/patient_barrier/{box[0]}"
    _patient.update(prefix=prefix, calls=itertools.count())
    if dist.get_world_size() == 1:
        return
    store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
    store.set(f"{prefix}/at/{rank}", b"-1")  # the last barrier this rank reached
    store.add(f"{prefix}/beat/{rank}", 1)
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(store, prefix, rank, stop),
                              name="bdt-patient-beat", daemon=True)
    _patient["beat"] = (thread, stop)
    thread.start()
    dist.barrier()  # every rank's keys are on the store


def _beat(store, prefix: str, rank: int, stop: threading.Event) -> None:
    while not stop.wait(PATIENT_BEAT_S):
        try:
            store.add(f"{prefix}/beat/{rank}", 1)
        except RuntimeError:  # the store is gone: the job is ending
            return


def _stop_heartbeat() -> None:
    """End the heartbeat thread, which lets go of the store: it must not hold rank 0's store
    server past destroy_process_group, nor wake in the middle of it."""
    thread, stop = _patient.pop("beat", (None, None))
    if thread is not None:
        stop.set()
        thread.join(timeout=PATIENT_BEAT_S)


def patient_barrier() -> None:
    """A barrier after parts some ranks do alone for long (rank 0 converting a checkpoint to a new
    world size, each node's first rank uploading one): met on the rendezvous store, whose wait
    takes its own bound, not in a collective, which ends the run at the process group's timeout
    (10 minutes in DeepSpeed 0.19) however well the part goes. Every rank calls it in turn. A
    rank that stops before it (an error, a kill, a lost node: its launcher may not stop the
    other nodes' ranks) ends the wait with RuntimeError once its heartbeat is silent."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if "prefix" not in _patient:
        raise RuntimeError("patient_barrier: call open_patient_barriers (init_distributed does) "
                           "once the process group is initialised")
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    prefix, call = _patient["prefix"], next(_patient["calls"])
    key = f"{prefix}/{call}"
    store.set(f"{prefix}/at/{dist.get_rank()}", str(call).encode())
    if store.add(key, 1) == world:  # the last rank to arrive opens it
        store.set(f"{key}/open", b"1")
    deadline = time.monotonic() + PATIENT_WAIT.total_seconds()
    heard, checked, pause = {}, -PATIENT_BEAT_S, 0.01
    # polled, not one long wait: every beat the waiters look at the ranks still away
    while not store.check([f"{key}/open"]):
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"patient_barrier: not every rank reached it within {PATIENT_WAIT}")
        if now - checked >= PATIENT_BEAT_S:
            _check_heartbeats(store, prefix, call, world, heard)
            checked = now
        time.sleep(pause)
        pause = min(2 * pause, 1.0, PATIENT_BEAT_S)  # quick for a short part, then 1/s at most
    # No rank leaves before all have seen it open: the store's host (rank 0) may end next, and
    # a rank still polling would lose the store. All are here: a wait of a poll or so.
    if store.add(f"{key}/seen", 1) == world:
        store.set(f"{key}/left", b"1")
    store.wait([f"{key}/left"], timedelta(seconds=PATIENT_SILENT_BEATS * PATIENT_BEAT_S))


def _check_heartbeats(store, prefix: str, call: int, world: int, heard: dict) -> None:
    """RuntimeError naming a rank that has not reached barrier `call` and whose heartbeat has
    not moved for PATIENT_SILENT_BEATS beats; `heard`: rank -> (beats, when they last moved)."""
    at = store.multi_get([f"{prefix}/at/{r}" for r in range(world)])
    beats = store.multi_get([f"{prefix}/beat/{r}" for r in range(world)])
    now = time.monotonic()
    for r in range(world):
        if int(at[r]) >= call:
            continue
        if heard.get(r, (None,))[0] != beats[r]:
            heard[r] = (beats[r], now)
        elif now - heard[r][1] > PATIENT_SILENT_BEATS * PATIENT_BEAT_S:
            raise RankGone(f"patient_barrier: rank {r} stopped before reaching it (no "
                           f"heartbeat for {now - heard[r][1]:.0f} s): see that rank's log")


def close_patient_barriers() -> None:
    """End this rank's heartbeat and forget the namespace (cleanup() calls it before the process
    group is destroyed)."""
    _stop_heartbeat()
    _patient.clear()
