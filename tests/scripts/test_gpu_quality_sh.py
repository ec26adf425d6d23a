"""scripts/gpu_quality.sh's checks before its long stages. (The stages themselves:
`scripts/gpu_quality.sh --cpu-rehearsal --tokenizer demo/tokenizer/export`.)"""

import json
import os
import subprocess
import sys

import pytest

from testkit import REPO


@pytest.mark.slow
def test_a_tokenizer_without_weights_stops_before_any_image(tmp_path):
    """A folder with config.json but no weights failed at the tokens stage, after the images
    (on a GPU: a minute of the session's device time)."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text(json.dumps({"z_channels": 8}))
    env = dict(os.environ, PYTHON=sys.executable, GPU_QUALITY_WORK=str(tmp_path / "work"))
    for name in ("OUT", "BDT_WHEELS", "GPU_QUALITY_KEEP"):
        env.pop(name, None)
    out = subprocess.run(["bash", "scripts/gpu_quality.sh", "--cpu-rehearsal", "--tokenizer",
                          str(tokenizer), str(tmp_path / "out")], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode != 0
    rows = (tmp_path / "out" / "stages.tsv").read_text().splitlines()
    assert [r.split("\t")[:2] for r in rows] == [["env", "0"], ["tokenizer", "1"]], out.stdout
    assert "weights" in (tmp_path / "out" / "tokenizer.log").read_text()
