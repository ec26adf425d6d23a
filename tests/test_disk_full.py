"""A full disk at bdt's writers, made real in a child process: RLIMIT_FSIZE (with SIGXFSZ
ignored) fails every write past the limit with EFBIG, as ENOSPC fails them on a full volume.
Each writer's error used to say nothing of the file, or was no OSError at all: torch's own file
writer said "basic_ios::clear: iostream error", safetensors and tokenizers raised their Rust
error as a bare Exception, and closing the file whose buffer held the failed write (the metrics
file's close in the loop's `finally`, open_atomic's under a shard) replaced the named error
with a bare "[Errno 27] File too large"."""

import json
import subprocess
import sys
import textwrap

from testkit import REPO

CHILD = textwrap.dedent("""
    import contextlib, json, os, resource, signal, sys
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from bdt import output_dirs, storage
    from bdt.data.shard_writer import ShardWriter
    from bdt.training.metrics import MetricsLogger
    from bdt.training.safe_load import RecordingCheckpointEngine

    out = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    big = {"w": torch.zeros(64 * 1024)}  # 256 KiB
    vocab = {f"t{i}": i for i in range(20000)}  # a tokenizer.json of some 300 KiB
    engine = RecordingCheckpointEngine()
    engine.zipfile_serialization = True  # as DeepSpeed's config sets it by default

    def shard(path):
        with ShardWriter(path) as tar:
            tar.write({"__key__": "k", "bin": bytes(256 * 1024)})

    libraries = {  # what a caller's storage.naming_url makes of their errors
        "checkpoint": lambda p: engine.save(big, p),
        "safetensors": lambda p: save_file(big, p),
        "tokenizers": lambda p: Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(p),
    }
    def report(path):  # as bdt sample and bdt eval write theirs
        with output_dirs.staged_dir(path) as tmp:
            with open(os.path.join(tmp, "grid.png"), "wb") as f:
                f.write(bytes(256 * 1024))

    bdts = {"atomic": lambda p: storage.write_bytes_atomic(p, bytes(256 * 1024)), "shard.tar": shard,
            "report": report}
    seen = {}
    for name, write in {**libraries, **bdts}.items():
        path = os.path.join(out, name)
        try:
            with storage.naming_url(path, "writing") if name in libraries else contextlib.nullcontext():
                write(path)
        except OSError as e:
            seen[name] = str(e)
    logger = MetricsLogger(out, True, tensorboard=False)
    try:
        for step in range(100000):
            logger.log(step, {"loss": 1.0, "padding": 2.0 ** 0.5})
    except OSError as e:
        seen["metrics"] = str(e)
    logger.close()  # the failed line is not written again: no second error
    seen["left"] = sorted(os.listdir(out))
    print(json.dumps(seen))
""")


def test_every_writer_names_its_file_and_the_os_error_on_a_full_disk(tmp_path):
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.splitlines()[-1])
    for name in ("checkpoint", "safetensors", "tokenizers", "atomic", "shard.tar", "report"):
        assert seen.get(name) == f"writing {tmp_path / name}: [Errno 27] File too large", seen
    # bdt's atomic writes leave nothing, no temp or staging either (the libraries' may leave a part)
    assert set(seen["left"]) <= {"checkpoint", "metrics.jsonl", "safetensors", "tokenizers"}, seen
    assert seen.get("metrics") == \
        f"appending to {tmp_path / 'metrics.jsonl'}: [Errno 27] File too large", seen
