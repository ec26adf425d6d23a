"""What bdt.cluster.resume judges around a launch: the rendezvous endpoint a command will use
(checked before launching), and whether an error the trainer met before its first step is worth
a restart (bdt/train.py records it, since a launcher's exit code cannot carry it)."""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping

from bdt.data.shard_source import EmptyRemoteListing

# Before the first step, these errors state the configuration or the inputs: the next launch meets
# them again. (bdt phrases its own input errors as ValueError or as an OSError without errno.)
UNFIXABLE = {"ValueError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError"}
# Anywhere in an error's chain, these say that the network, the store or a stopping job was in the
# way (s3fs: SlowDown is EBUSY, InternalError EREMOTEIO; a remote data source that listed no
# shards, as a store's listing may briefly do), which a restart may get past.
TRANSIENT_TYPES = re.compile(rf"Timeout|Connect|Throttl|Unavailable|RunDirInUse|"
                             rf"{EmptyRemoteListing.__name__}")
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH,
                    errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE, errno.EREMOTEIO}


def retry_may_fix(record: object) -> bool:
    """Whether a launch error the trainer recorded (bdt.training.run_dir.record_launch_error) may go away
    on a restart; anything this cannot judge (no chain, or one not of the recorded shape: a
    list of {"types": [str, ...], "errno": int | None}) is restarted, as a crash is."""
    chain = _error_chain(record)
    if chain is None:
        return True
    if any(TRANSIENT_TYPES.search(name) or number in TRANSIENT_ERRNOS
           for types, number in chain for name in types):
        return True
    first, number = chain[0]
    bdt_os_error = first[:1] == ["OSError"] and number is None
    return not (UNFIXABLE & set(first) or bdt_os_error)


def _error_chain(record: object) -> list[tuple[list[str], int | None]] | None:
    """(types, errno) per error of a record's chain; None when it has none or another shape."""
    chain = record.get("errors") if isinstance(record, Mapping) else None
    if not isinstance(chain, list) or not chain:
        return None
    out = []
    for link in chain:
        types = link.get("types") if isinstance(link, Mapping) else None
        number = link.get("errno") if isinstance(link, Mapping) else None
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types) or \
                (number is not None and type(number) is not int):
            return None
        out.append((types, number))
    return out


def _flag(cmd: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(cmd):
        for name in names:
            if arg == name and i + 1 < len(cmd):
                return cmd[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


LAUNCH_SCRIPT = "cluster/deepspeed/launch.sh"
LAUNCH_SCRIPT_PORT = "29500"  # its default MASTER_PORT


def master_endpoint(cmd: list[str], env: Mapping[str, str]) -> tuple[str, int] | None:
    """(address, port) of the launch's rendezvous: the launcher's --master-addr/--master-port
    (torchrun, deepspeed), else MASTER_ADDR/MASTER_PORT, else, for cluster/deepspeed/launch.sh,
    what it will use: the first host of $HOSTFILE and port 29500. None when the command does
    not say (torchrun --standalone picks a free port itself) or launches another node than the
    first (--node-rank, NODE_RANK for launch.sh): only node 0's rank 0 listens on that port."""
    if "--standalone" in cmd:
        return None
    launch_sh = any(arg.endswith(LAUNCH_SCRIPT) for arg in cmd)
    # launch.sh reads NODE_RANK in its per-node mode only (pdsh: one launch, on the first host)
    env_rank = env.get("NODE_RANK", "") if launch_sh and \
        env.get("BDT_LAUNCHER", "node") == "node" else ""
    address = _flag(cmd, ("--master-addr", "--master_addr")) or env.get("MASTER_ADDR")
    port = _flag(cmd, ("--master-port", "--master_port")) or env.get("MASTER_PORT")
    if launch_sh and not env.get("HOSTFILE"):  # launch.sh would stop; the wrapper, restart it
        raise ValueError(f"HOSTFILE is not set: {LAUNCH_SCRIPT} needs a DeepSpeed hostfile "
                         f"(host slots=N per line)")
    if launch_sh:
        from bdt.cluster.hosts import read_hostfile

        hosts = list(read_hostfile(env["HOSTFILE"]))  # checked even with MASTER_ADDR set
        if env_rank and not (env_rank.isdigit() and int(env_rank) < len(hosts)):
            # deepspeed's launcher: a bare AssertionError, restarted as a crash
            raise ValueError(f"NODE_RANK={env_rank!r} names no node of {env['HOSTFILE']} "
                             f"(0 .. {len(hosts) - 1}: {', '.join(hosts)})")
        address = address or hosts[0]
        port = port or LAUNCH_SCRIPT_PORT
    if not address or not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"master port {port!r} (--master-port or MASTER_PORT) is not a TCP port")
    node_rank = _flag(cmd, ("--node-rank", "--node_rank")) or env_rank
    if node_rank not in (None, "", "0"):  # only node 0's rank 0 listens on that port
        return None
    return address, int(port)
