"""What a SIGKILL of the tokenizer trainer leaves on disk, recreated directly, and the rerun that
must clean it up (scripts/chaos_extract.py tokenizer kills real runs)."""

import os
import subprocess
import sys

import pytest

from bdt.data.shapes import ShapesConfig
from bdt.data.shards import generate
from bdt.tokenizer.io import tokenizer_identity

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
def test_temps_of_a_killed_export_and_config_write_are_removed_by_the_rerun(tmp_path):
    """A kill inside the export (or the config.yaml write) leaves `.NAME.tmp-*`: nothing would
    ever remove it, and the extraction's tokenizer identity would hash the half-written weights
    as a file of the tokenizer."""
    generate(ShapesConfig(out=str(tmp_path / "data"), num=4, sizes=["32"], per_shard=4, format="png"))
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    stale = [run_dir / "export" / ".model.safetensors.tmp-0123abcd", run_dir / "export" / ".config.json.tmp-0123abcd",
             run_dir / ".config.yaml.tmp-0123abcd"]
    for path in stale:
        path.write_bytes(b"half")
    # A process of its own, as a rerun is (DeepSpeed's globals allow one engine per test process).
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run([sys.executable, "tokenizers/train.py", f"run_dir={run_dir}",
                    f"data.shards={tmp_path}/data/shapes-000000.tar", "steps=1", "model.ch=32",
                    "model.ch_mult=[1]", "model.num_res_blocks=1", "model.z_channels=8", "data.size=16",
                    "data.num_workers=0", "deepspeed.micro_batch_size=2", "logging.image_every=0",
                    "logging.tensorboard=false"], cwd=REPO, env=env, check=True, capture_output=True)
    assert not [p for p in stale if p.exists()]
    assert sorted(tokenizer_identity(str(run_dir / "export"))["sha256"]) == ["config.json", "model.safetensors"]
