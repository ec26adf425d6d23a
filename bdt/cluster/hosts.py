"""Node lists and DeepSpeed hostfiles for multi-node launches.

    python -m bdt.cluster.hosts slurm --hostfile RUN/hostfile    # inside an allocation: prints
        MASTER_ADDR=... MASTER_PORT=... NNODES=... SLOTS=...     # shell assignments to `eval`
    python -m bdt.cluster.hosts master --hostfile HOSTFILE       # first host of a hostfile
    python -m bdt.cluster.hosts ds-env --out RUN/.deepspeed_env  # forwardable variables

The master port is derived from the job id, so that every node agrees on it; on the master node
itself a port another process listens on is passed over for the next free one.
A SLURM node list (`gpu[001-004,009],io7`) is expanded by `scontrol show hostnames` when SLURM's
tools are on PATH (SLURM's own reading of its syntax), else by python-hostlist. Hostfiles are read
back with DeepSpeed's own parser, so a file we accept is one the `deepspeed` launcher accepts.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import psutil

from bdt import storage

# Variables worth forwarding to every node through .deepspeed_env: S3 endpoint/region/profile,
# NCCL and libfabric tuning, offline switches. Credentials are deliberately not in the list: the
# file is plain text and DeepSpeed puts its values on the ssh command line (visible in `ps`);
# nodes get credentials from an instance role or a shared ~/.aws instead.
FORWARD_PREFIXES = ("AWS_", "NCCL_", "FI_", "HF_", "TORCH_NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS",
                    "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "DS_ACCELERATOR")
# The key id goes with its secret: alone on a node it makes botocore fail (partial credentials).
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "HF_TOKEN")
# ... and any other name that says it holds one (AWS_CONTAINER_AUTHORIZATION_TOKEN, ...).
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
# What DeepSpeed's runner puts verbatim inside "..." on the remote shell's command line: `$`, a
# backquote, `"` or `\` there would be expanded or break the quoting.
SHELL_SAFE_VALUE = re.compile(r'[^"$`\\\n]*')


def expand_nodelist(nodelist: str, use_scontrol: bool | None = None) -> list[str]:
    """Host names of a SLURM node list, in SLURM's order; ValueError on an empty or bad list."""
    if not nodelist.strip():
        raise ValueError("SLURM node list is empty (is SLURM_JOB_NODELIST set? run inside an "
                         "allocation: sbatch / salloc)")
    if use_scontrol is None:
        use_scontrol = shutil.which("scontrol") is not None
    if use_scontrol:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise ValueError(f"scontrol cannot expand node list '{nodelist}': "
                             f"{done.stderr.strip()}")
        hosts = done.stdout.split()
    else:
        import hostlist

        try:
            hosts = hostlist.expand_hostlist(nodelist)
        except hostlist.BadHostlist as exc:
            raise ValueError(f"bad SLURM node list '{nodelist}': {exc}") from None
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"SLURM node list '{nodelist}' names a host twice")
    return hosts


def slots_per_node(env: Mapping[str, str]) -> int:
    """Processes per node from the allocation: GPUs on the node, else (none, or a CPU-only
    allocation's 0) tasks per node."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        raw = env.get(name, "").strip()
        if raw:
            # SLURM_GPUS_PER_NODE may carry a type ("a100:8"); tasks per node may be "8(x2)",
            # and a list of them ("8(x2),4") when the nodes differ.
            counts = set()
            for part in raw.split(","):
                # type prefixes ("gpu:a100:"), a repeat or socket suffix ("(x2)", "(S:0-1)")
                match = re.fullmatch(r"(?:[\w.-]+:)*(\d+)(?:\([^)]*\))?", part.strip())
                if not match:
                    raise ValueError(f"{name}='{raw}': cannot read a process count per node from it")
                counts.add(int(match.group(1)))
            if counts == {0} and name.startswith("SLURM_GPUS"):
                continue  # a CPU allocation: the tasks per node say it
            if 0 in counts:
                raise ValueError(f"{name}='{raw}': a node with no processes")
            if len(counts) > 1:
                raise ValueError(f"{name}='{raw}': the nodes run different numbers of processes; "
                                 f"a hostfile gives every node the same (ask for a uniform "
                                 f"allocation, or pass --slots)")
            return counts.pop()
    raise ValueError("cannot tell processes per node: none of SLURM_GPUS_ON_NODE, "
                     "SLURM_GPUS_PER_NODE, SLURM_NTASKS_PER_NODE is set (ask for --gpus-per-node, "
                     "or pass --slots)")


def master_port(job_id: str | int, low: int = 20000, span: int = 20000, skip: int = 0) -> int:
    """A port every node derives alike from the job id; two jobs sharing a node rarely clash.
    `skip` moves on to the next candidates (when the first is taken)."""
    return low + (int(job_id) + skip) % span


def is_this_host(address: str) -> bool:
    """Whether `address` (a host name or IP) names this machine: loopback, its host name, or
    an address of one of its interfaces."""
    if address == socket.gethostname():
        return True
    try:
        resolved = {info[4][0].split("%")[0] for info in socket.getaddrinfo(address, None)}
    except (socket.gaierror, UnicodeError):
        return False
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(resolved & mine) or any(ipaddress.ip_address(ip).is_loopback for ip in resolved)


def port_holder(port: int) -> str | None:
    """None when a rendezvous server could listen on TCP `port` here, else who holds it. Binds
    the wildcard addresses with SO_REUSEADDR, as torch's TCPStore does (so a port left in
    TIME_WAIT by an earlier launch counts as free)."""
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((wildcard, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return _listener(port)
            # no IPv6 on this machine, or the like: that family cannot clash
    return None


def _listener(port: int) -> str:
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN and c.pid}
        names = [f"pid {pid} ({' '.join(' '.join(psutil.Process(pid).cmdline()).split())[:80]})"
                 for pid in sorted(pids)]
    except (psutil.Error, OSError):  # another user's process: no name, still taken
        names = []
    return ", ".join(names) or "another process"


def free_master_port(job_id: str | int, tries: int = 100) -> int:
    """The job's master port, or the next candidate when another process holds it on this host
    (call it on the master node; the others must receive the result, not derive it)."""
    for skip in range(tries):
        if port_holder(master_port(job_id, skip=skip)) is None:
            return master_port(job_id, skip=skip)
    raise ValueError(f"no free master port on this host among the {tries} candidates from "
                     f"{master_port(job_id)} on")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    if not hosts:
        raise ValueError("no hosts for the hostfile")
    if slots < 1:
        raise ValueError(f"slots per host must be >= 1, got {slots}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(path: str, hosts: Sequence[str], slots: int) -> None:
    storage.write_bytes_atomic(path, hostfile_text(hosts, slots).encode())


def read_hostfile(path: str) -> dict[str, int]:
    """host -> slots, parsed by DeepSpeed's launcher code (the same rules `deepspeed` applies)."""
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise ValueError(f"hostfile not found: {path}") from None
    try:
        hosts = dict(_parse_hostfile(lines))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    idle = [f"{host} slots={n}" for host, n in hosts.items() if n < 1]
    if idle:  # the master would be a host that runs no rank: the rendezvous hangs
        raise ValueError(f"{path}: {', '.join(idle)}: every host runs at least one rank")
    return hosts


def not_forwardable(key: str, value: str) -> str | None:
    """Why .deepspeed_env cannot carry this variable intact to another node (None: it can)."""
    if not key.isidentifier() or not key.isascii():
        return "not a shell variable name"
    if not SHELL_SAFE_VALUE.fullmatch(value):
        return "its value holds a newline, $, `, \" or \\ (the remote shell would change it)"
    if value != value.strip():
        return "its value starts or ends with white space (DeepSpeed strips it)"
    return None


def _wanted(env: Mapping[str, str]) -> dict[str, tuple[str, str | None]]:
    """name -> (value, why it cannot be carried or None) of the variables worth forwarding."""
    return {k: (v, not_forwardable(k, v)) for k, v in sorted(env.items())
            if k.startswith(FORWARD_PREFIXES) and k not in SECRET_NAMES
            and not any(word in k for word in SECRET_WORDS)}


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of `env` that .deepspeed_env should carry to the other nodes."""
    return {k: v for k, (v, why) in _wanted(env).items() if why is None}


def left_out_env(env: Mapping[str, str]) -> dict[str, str]:
    """name -> why, for the variables worth forwarding that .deepspeed_env cannot carry."""
    return {k: why for k, (_, why) in _wanted(env).items() if why is not None}


def slurm_launch_env(env: Mapping[str, str], hostfile: str, slots: int | None = None,
                     use_scontrol: bool | None = None) -> dict[str, str]:
    """Write the allocation's hostfile; return the launch variables for the batch script."""
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")),
                            use_scontrol)
    slots = slots or slots_per_node(env)
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        raise ValueError("SLURM_JOB_ID is not set: run inside an allocation (sbatch / salloc)")
    if not job_id.isdigit():  # the master port is derived from it
        raise ValueError(f"SLURM_JOB_ID='{job_id}' is not a job id (a number)")
    write_hostfile(hostfile, hosts, slots)
    # The batch script runs on the first node: only there can a taken port be seen and skipped.
    port = free_master_port(job_id) if is_this_host(hosts[0]) else master_port(job_id)
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(port),
            "NNODES": str(len(hosts)), "SLOTS": str(slots), "WORLD": str(len(hosts) * slots)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdt.cluster.hosts",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slurm", help="hostfile from the allocation; prints launch variables")
    p.add_argument("--hostfile", required=True, help="where to write the hostfile")
    p.add_argument("--slots", type=int, default=0, help="processes per node (default: GPUs)")
    p = sub.add_parser("master", help="print the first host of a hostfile")
    p.add_argument("--hostfile", required=True)
    p = sub.add_parser("ds-env", help="write the forwardable variables as a .deepspeed_env file")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    # Scripts capture stdout (MASTER_ADDR=$(... master ...)): a library's log line there (DeepSpeed
    # logs to stdout when it picks an accelerator) would become part of the value.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        if args.command == "slurm":
            values = slurm_launch_env(os.environ, args.hostfile, args.slots or None)
            print("\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items()), file=out)
        elif args.command == "master":
            print(next(iter(read_hostfile(args.hostfile))), file=out)
        else:
            lines = "".join(f"{k}={v}\n" for k, v in forwarded_env(os.environ).items())
            storage.write_bytes_atomic(args.out, lines.encode())
            for key, why in left_out_env(os.environ).items():
                print(f"bdt.cluster.hosts ds-env: not forwarding {key}: {why}", file=sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"bdt.cluster.hosts {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = out
    return 0


if __name__ == "__main__":
    sys.exit(main())
