"""`torchrun` for tests, with its agent's store on 127.0.0.1 only (torch's TCPStore server
listens on every interface whatever --master-addr says, and torchrun has no option to bind it).
Run it as `python tests/loopback_torchrun.py ARGS` (TORCHRUN below) or as `torchrun` from the
folder `torchrun_on_path` makes (for code that runs `torchrun` from PATH); it is torchrun in
every other way: the same process (its ranks' launcher), arguments, rendezvous and exit codes."""

import os
import shlex
import socket
import sys

import torch.distributed as dist

TORCHRUN = [sys.executable, os.path.abspath(__file__)]
_FIELDS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers",
           "multi_tenant", "master_listen_fd", "use_libuv")


class LoopbackTCPStore(dist.TCPStore):
    """A TCPStore whose server (is_master) listens on a socket bound here on 127.0.0.1 at the
    asked port (0: any); clients are torch's own."""

    def __init__(self, *args, **kwargs):
        kwargs.update(zip(_FIELDS, args))
        if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's does
            try:
                sock.bind(("127.0.0.1", kwargs["port"]))
            except OSError as e:  # the error torch's rendezvous expects from a taken port
                sock.close()
                raise RuntimeError(f"cannot bind 127.0.0.1:{kwargs['port']}: {e}") from None
            sock.listen(socket.SOMAXCONN)
            kwargs["port"] = sock.getsockname()[1]
            kwargs["master_listen_fd"] = sock.detach()
        super().__init__(**kwargs)


def torchrun_on_path(folder) -> str:
    """Write an executable `torchrun` running this module into `folder`; returns a PATH with the
    folder first."""
    path = os.path.join(folder, "torchrun")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.join(TORCHRUN)} "$@"\n')
    os.chmod(path, 0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def main() -> None:
    from torch.distributed.elastic.rendezvous import (c10d_rendezvous_backend,
                                                      static_tcp_rendezvous)
    from torch.distributed.run import main as torchrun

    # every place torch 2.13's agent makes a store (static, c10d, dynamic's shared store)
    dist.TCPStore = LoopbackTCPStore
    static_tcp_rendezvous.TCPStore = c10d_rendezvous_backend.TCPStore = LoopbackTCPStore
    if not any(a.split("=")[0] in ("--local-addr", "--local_addr") for a in sys.argv):
        # the address the ranks are told to reach the store at (else this host's name, which
        # may resolve to an address the store does not listen on)
        sys.argv.insert(1, "--local-addr=127.0.0.1")
    torchrun()


if __name__ == "__main__":
    main()
