"""bdt: train BitDance-style binary-token autoregressive text-to-image models."""

import os as _os


def _lineage() -> tuple[int, int, int | None]:
    """(this pid, its parent, the parent's parent), read in milliseconds (psutil only)."""
    import psutil

    pid, parent = _os.getpid(), _os.getppid()
    try:
        return pid, parent, psutil.Process(parent).ppid()
    except psutil.Error:
        return pid, parent, None


# Read at the first import of bdt, before torch loads (seconds): a rank's launcher that dies in
# that time leaves the rank reparented, and only this record still names it (training.distributed).
lineage_at_start = _lineage()
