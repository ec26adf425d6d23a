"""Process-group setup for a plain process, `torchrun` and the `deepspeed` launcher.

All three launchers describe the job with the same environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `python script.py` has none of them and runs as a
world of one, on an in-process store (no TCP rendezvous). DeepSpeed's communication layer is initialised on top of the torch process group so
that both agree on the backend (gloo on CPU, nccl on CUDA). A rank started by a launcher
watches it (`watch_launcher`) and stops when it dies. The collectives below are no-ops in a world
of one.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil
import torch
import torch.distributed as dist

import bdt
from bdt.training.patient_barrier import RankGone, close_patient_barriers, open_patient_barriers

DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
LAUNCHER_GRACE_S = 300.0
LAUNCHER_GONE_EXIT = 1
launcher_gone = threading.Event()  # set by watch_launcher; signals.StopFlag reads it
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Whether this rank does its node's once-per-node work (s3:// checkpoint staging).
        A world of one is its node's only rank whatever LOCAL_RANK says (one left in the
        shell, or set to pick a GPU): it skipped that work, and s3:// saves failed."""
        return self.local_rank == 0 or self.world_size == 1


def disable_deepspeed_shm_op() -> None:
    """Skip the shared-memory comm op DeepSpeed JIT-builds at init (environment.md).

    Building it costs ~30 s and leaves a 66 MB file per rank in /dev/shm; training never uses it.
    Patched through sys.modules: `import deepspeed.comm.torch` binds the *torch* package instead.
    """
    importlib.import_module("deepspeed.comm")  # imports deepspeed.comm.torch
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launch's master port (another process may take
    it before the bind: launchers and tests that can retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_watching: list = []  # the launcher watch of this process, started once
_setting_up = threading.Event()  # set while init_distributed runs: a launcher death exits at once


def init_distributed(use_deepspeed: bool = True) -> DistInfo:
    """Initialise the process group from the launcher's environment (or a world of one). A rank
    started by a launcher stops when the launcher dies (watch_launcher); one whose launcher is
    gone before or during this call exits at once, rather than wait out the rendezvous."""
    _setting_up.set()
    try:
        if "RANK" in os.environ and not _watching:
            _watching.append(watch_launcher())
        return _init_process_group(use_deepspeed)
    finally:
        _setting_up.clear()


def _init_process_group(use_deepspeed: bool) -> DistInfo:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    solo = "MASTER_PORT" not in os.environ  # no launcher
    if solo and world_size > 1:
        raise ValueError("WORLD_SIZE > 1 but MASTER_PORT is not set: start the job with "
                         "torchrun or deepspeed, or set MASTER_ADDR/MASTER_PORT")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if backend == "gloo" and not solo:
        _gloo_on_loopback()
    server = None if solo or dist.is_initialized() else _loopback_store(rank, world_size)
    if solo and not dist.is_initialized():
        # A world of one needs no rendezvous: an in-process store, no TCP port to pick (a free
        # port picked first was once taken by another process before the bind)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if use_deepspeed:  # it takes over a process group that is already initialised
        disable_deepspeed_shm_op()
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    del server  # torch's own rank-0 store (multi-tenant, same port) serves from it now
    open_patient_barriers()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _loopback_store(rank: int, world_size: int) -> dist.TCPStore | None:
    """Rank 0's rendezvous store for a job on one machine (MASTER_ADDR a loopback address, as the
    `deepspeed` launcher sets there), listening on that address only: the store torch makes
    listens on every interface whatever MASTER_ADDR says, open to any host that reaches the port
    (the store is unauthenticated; gloo takes its peers' addresses from it). None elsewhere,
    under torchrun (its agent holds the store), or when the bind fails (torch's then fails)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    try:
        loopback = ipaddress.ip_address(addr).is_loopback
    except ValueError:  # a host name
        return None
    if (rank != 0 or not loopback or not port.isdigit()
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)):
        return None
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's does
        sock.bind((addr, int(port)))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        return None
    return dist.TCPStore(addr, int(port), world_size, is_master=True, wait_for_workers=False,
                         multi_tenant=True, master_listen_fd=sock.detach())


def _gloo_on_loopback() -> None:
    """Bind gloo's rank sockets to the loopback interface for a job whose MASTER_ADDR is loopback
    (all its ranks on this machine): gloo binds the address this host's name resolves to, often
    an external one, unless GLOO_SOCKET_IFNAME names an interface. A value already set stays."""
    addr = os.environ.get("MASTER_ADDR", "")
    if addr == "localhost":  # what `torchrun --standalone` tells its ranks
        addr = "127.0.0.1"
    try:
        if "GLOO_SOCKET_IFNAME" in os.environ or not ipaddress.ip_address(addr).is_loopback:
            return
    except ValueError:  # a host name: maybe another machine's
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def watch_launcher(grace_s: float = LAUNCHER_GRACE_S, poll_s: float = 1.0) -> threading.Thread:
    """Stop this rank when its launcher dies. Found gone while init_distributed runs (before or
    in the rendezvous, which would wait for the process-group timeout), the rank exits at once:
    nothing needs saving yet. Later, `StopFlag.should_stop` answers STOP_SIGNAL from then on (the
    loop saves at the next step boundary and exits, as on SIGTERM; a signal could land outside
    the loop and kill it mid-export), and a rank still running `grace_s` later (hung in a
    collective, say) is killed. Checked by a thread every `poll_s`, first at once."""
    launcher_alive = _launcher_liveness()
    if _setting_up.is_set() and not launcher_alive():
        _exit_before_training()

    def watch() -> None:
        while launcher_alive():
            time.sleep(poll_s)
        if _setting_up.is_set():
            _exit_before_training()
        log.warning("pid %d: its launcher is gone: stopping (a checkpoint at the next step, "
                    "exit within %.0f s)", os.getpid(), grace_s)
        launcher_gone.set()
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="bdt-launcher-watch", daemon=True)
    thread.start()
    return thread


def _exit_before_training() -> None:
    """Exit at once, from any thread: the main one may be blocked in the rendezvous."""
    log.error("pid %d (rank %s): its launcher is gone before training began: exiting now "
              "(nothing to save) rather than wait for the process-group timeout",
              os.getpid(), os.environ.get("RANK", "?"))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(LAUNCHER_GONE_EXIT)


def _launcher_liveness() -> Callable[[], bool]:
    """Whether the launcher that started this process still runs. The launcher is the parent
    (torchrun, mp.spawn's parent, slurmstepd) as recorded at the first import of bdt
    (`bdt.lineage_at_start`, before torch loads), not the parent now: one that died since left
    this process to pid 1 or a subreaper, which is what a launcher that is pid 1 itself (a
    container's entrypoint) looks like too. Under the `deepspeed` command it is also the parent's
    parent, since the per-node `deepspeed.launcher.launch` that starts the ranks outlives the
    command. A death shows as reparenting (a pid cannot be reused while we are its child), which
    also works where PR_SET_PDEATHSIG does not (a parent whose forking thread ends, another OS)."""
    pid, parent, grandparent = bdt.lineage_at_start
    if pid != os.getpid():  # a forked child: the record is its parent's
        parent, grandparent = os.getppid(), None
    checks = [(os.getppid, parent)]
    started_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and os.getsid(0) == os.getpid()
    if started_by_torchrun and not _maps_torch(parent):  # (it starts each rank in a new session)
        return lambda: False  # torchrun's agent (which loads torch) died before bdt was imported
    try:
        node_launcher = psutil.Process(parent)
        if DEEPSPEED_NODE_LAUNCHER in " ".join(node_launcher.cmdline()):
            grandparent = node_launcher.ppid() if grandparent is None else grandparent
            if grandparent == 1 and not _runs_deepspeed(1):
                return lambda: False  # its `deepspeed` command died before it started us
            checks.append((node_launcher.ppid, grandparent))
    except psutil.Error:
        pass  # the parent is gone: the first check says so

    def launcher_alive() -> bool:
        try:
            return all(current() == expected for current, expected in checks)
        except psutil.Error:  # the node launcher itself is gone
            return False

    return launcher_alive


def _runs_deepspeed(pid: int) -> bool:
    """Whether `pid` runs a `deepspeed` command (a container's entrypoint, say); unreadable: yes."""
    try:
        return "deepspeed" in " ".join(psutil.Process(pid).cmdline())
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False


def _maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch loaded, as torchrun's agent has. A launcher that forked
    us runs with our credentials, so we may read its maps; if not (pid 1 of a sandbox, say),
    its command line decides."""
    try:
        process = psutil.Process(pid)
        try:
            return any("libtorch" in region.path for region in process.memory_maps())
        except psutil.AccessDenied:
            return "torch" in " ".join(process.cmdline())
    except psutil.Error:
        return False


# What a collective raises on a rank when another rank of the job ended mid-run: gloo's transport
# errors are plain RuntimeErrors (torch 2.13), NCCL's a DistBackendError.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer_line(exc: BaseException) -> str | None:
    """One line for a rank whose collective failed because another rank ended; None for any
    other error and in a world of one. Every surviving rank printed a transport traceback, and
    the launcher's log ended on them, burying the one rank's error that said why."""
    try:
        world = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return None
    if world < 2 or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip()
    if not (isinstance(exc, (RankGone, dist.DistBackendError))
            or any(sign in text for sign in _PEER_GONE)):
        return None
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return (f"rank {os.environ.get('RANK', '?')} of {world}: another rank ended while this one "
            f"waited for it ({first}); that rank's own error, above or in its node's log, says "
            f"why (one killed by a signal or the OOM killer leaves none)")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier + destroy: ending without it occasionally aborted a rank at exit (environment.md).
    The patient barriers' heartbeat thread ends first."""
    close_patient_barriers()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(value: int, device: torch.device) -> int:
    """Sum of an integer count over ranks (exact: int64)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_int(value: int) -> list[int]:
    """Every rank's `value`, in rank order (a world of one: [value])."""
    return all_gather_object(int(value))


def all_gather_object(obj) -> list:
    """Every rank's small python object `obj`, in rank order (a world of one: [obj])."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a small python object (e.g. a checkpoint tag) from `src` to all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
