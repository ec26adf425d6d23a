"""A full disk at bdt's writers, made real in a child process: RLIMIT_FSIZE (with SIGXFSZ
ignored) fails every write past the limit with EFBIG, as ENOSPC fails them on a full volume.
Each writer's error used to say nothing of the file, or was no OSError at all: torch's own file
writer said "basic_ios::clear: iostream error", safetensors and tokenizers raised their Rust
error as a bare Exception, and the metrics file's close in the loop's `finally` replaced the
named error with a bare "[Errno 27] File too large"."""

import json
import subprocess
import sys
import textwrap

from testkit import REPO

CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from bdt import storage
    from bdt.training.metrics import MetricsLogger
    from bdt.training.safe_load import RecordingCheckpointEngine

    out = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    big = {"w": torch.zeros(64 * 1024)}  # 256 KiB
    vocab = {f"t{i}": i for i in range(20000)}  # a tokenizer.json of some 300 KiB
    engine = RecordingCheckpointEngine()
    engine.zipfile_serialization = True  # as DeepSpeed's config sets it by default
    writers = {
        "checkpoint": lambda p: engine.save(big, p),
        "safetensors": lambda p: save_file(big, p),
        "tokenizers": lambda p: Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(p),
    }
    seen = {}
    for name, write in writers.items():
        path = os.path.join(out, name)
        try:
            with storage.naming_url(path, "writing"):
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
    print(json.dumps(seen))
""")


def test_every_writer_names_its_file_and_the_os_error_on_a_full_disk(tmp_path):
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.splitlines()[-1])
    for name in ("checkpoint", "safetensors", "tokenizers"):
        assert seen.get(name) == f"writing {tmp_path / name}: [Errno 27] File too large", seen
    assert seen.get("metrics") == \
        f"appending to {tmp_path / 'metrics.jsonl'}: [Errno 27] File too large", seen
