"""A tiny trained run for the `bdt sample` / `bdt eval` tests: shapes renders encoded by a tiny
image tokenizer into token shards (+ a manifest naming the bucket), then the real
`bdt/train.py` (one plain process) for a few steps, which writes `<run>/export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evalutil import BUCKET
from testkit import REPO, TINY_CONFIG, save_tiny_image_tokenizer

BITS = 16


def _token_shards(out_dir: str, tokenizer, n: int = 24) -> None:
    """Shapes renders -> tiny tokenizer bits -> one token shard, and an extraction-style
    index.json whose family "16" lists that shard and its bucket."""
    import webdataset as wds

    from bdt.data.shapes import make_sample
    from bdt.data.token_shards import TokenSample, encode_sample
    from bdt.tokenizer.bits import pack_bits

    os.makedirs(os.path.join(out_dir, "16"), exist_ok=True)
    with wds.TarWriter(os.path.join(out_dir, "16", "000000.tar"), encoder=False) as sink:
        for i in range(n):
            image, text, _ = make_sample(0, i, [BUCKET])
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
            packed = pack_bits(tokenizer.encode(x))[0].numpy()
            sink.write(encode_sample(TokenSample(
                key=f"k{i:04d}", bits_hwB=packed, bits_per_token=BITS, bucket=BUCKET,
                caption=text, source_key=f"k{i:04d}", source_shard="raw.tar", stage="16")))
    index = {"stages": {"16": {"resolution": 16, "buckets": [list(BUCKET)],
                               "shards": [{"shard": "16/000000.tar", "samples": n}]}}}
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """Run dir of a 3-step tiny training with an EMA; its export is `<run>/export`."""
    from bdt.model.backbone import make_tiny_llm
    from bdt.eval.suite import load_suite

    base = tmp_path_factory.mktemp("tiny_run")
    captions = [item["prompt"] for item in load_suite()]
    llm = make_tiny_llm(str(base / "llm"), captions, hidden=32, layers=1, heads=2, kv_heads=1,
                        intermediate=64, vocab_size=384, max_position_embeddings=512)
    tokenizer = save_tiny_image_tokenizer(str(base / "tok"), BITS)
    _token_shards(str(base / "tokens"), tokenizer)
    run_dir = base / "run"
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"),
           "--config", TINY_CONFIG,
           f"run_dir={run_dir}", f"model.backbone.path={llm}", f"data.root={base / 'tokens'}",
           f"data.tokenizer={base / 'tok'}", "deepspeed.zero_stage=1", "deepspeed.grad_accum=1",
           "stages=[{name: s16, shards: '${data.root}', family: '16', steps: 3, "
           "token_budget: 256, lr: 3e-3, warmup_steps: 1}]", "checkpoint.every=0",
           "ema_decay=0.9"]  # the export samples with EMA weights, so must a checkpoint
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, cwd=str(base), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (run_dir / "export" / "model_config.yaml").is_file()
    return str(run_dir)

