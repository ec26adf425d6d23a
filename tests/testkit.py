"""Small builders shared by tests in several folders (tests/ is on sys.path via tests/conftest.py)."""

import signal
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "train" / "tiny.yaml")  # the tiny AR model of CPU tests


def terminal_job_signals() -> None:
    """In a child before exec (preexec_fn, a pty child): SIGINT and SIGHUP at their defaults, as
    a job in a terminal has them. A suite started in the background (bash ignores SIGINT there,
    as some CI runners do) or under nohup (SIGHUP) passes those ignores on, and bdt keeps a stop
    signal that was ignored at the start ignored."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def save_tiny_image_tokenizer(out_dir: str, bits: int = 16, seed: int = 0):
    """A seeded, randomly initialised 2x-downsampling binary autoencoder saved as a tokenizer
    directory; returns the model. The global RNG is left as it was."""
    from bdt.tokenizer.autoencoder import BinaryAutoencoder
    from bdt.tokenizer.config import TokenizerConfig
    from bdt.tokenizer.io import save_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BinaryAutoencoder(TokenizerConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1,
                                                  z_channels=bits))
    save_tokenizer(model, out_dir)
    return model


class PlantedPickle:
    """Unpickling this runs open(target, "w"), creating the file: what an attacker who can
    write a checkpoint directory could plant. Nothing may unpickle it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def flip_bytes(path, n: int = 256) -> None:
    """Invert n bytes in the middle of a file: the same size, different content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def cut_file(path) -> None:
    """Truncate a file to two thirds of its size."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def training_ranks(root_pid: int) -> dict[int, psutil.Process]:
    """RANK -> process of the train.py ranks below root_pid; processes that exit while they are
    read (launcher probes, finished ranks) are skipped."""
    ranks = {}
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "train.py" in " ".join(proc.cmdline()) and "RANK" in (env := proc.environ()):
                ranks[int(env["RANK"])] = proc
        except psutil.Error:
            pass
    return ranks


def pauses_that(monkeypatch, action=lambda: None) -> list[float]:
    """The tar readers' pauses before a failed read is tried again (bdt.data.tar_reads.ReadRetries),
    recorded instead of slept; `action` runs in the first one (the fault clears)."""
    import bdt.data.tar_reads as tar_reads

    pauses = []

    def pause(seconds):
        pauses.append(seconds)
        if len(pauses) == 1:
            action()
    monkeypatch.setattr(tar_reads, "time", SimpleNamespace(sleep=pause), raising=False)  # old code
    return pauses
