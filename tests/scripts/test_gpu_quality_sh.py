"""scripts/gpu_quality.sh's checks before its long stages. (The stages themselves:
`scripts/gpu_quality.sh --cpu-rehearsal --tokenizer demo/tokenizer/export`.)"""

import json
import os
import subprocess
import sys

import pytest

from testkit import REPO


def run_rehearsal(tmp_path, tokenizer, timeout: int, **env_extra) -> subprocess.CompletedProcess:
    """gpu_quality.sh --cpu-rehearsal into tmp_path/out, none of the caller's OUT, wheels (a
    checkout's ./wheels made for a GPU machine's Python, too) or keep settings leaking in."""
    env = dict(os.environ, GPU_QUALITY_WORK=str(tmp_path / "work"), BDT_WHEELS="none",
               **env_extra)
    for name in ("OUT", "GPU_QUALITY_KEEP"):
        env.pop(name, None)
    return subprocess.run(["bash", "scripts/gpu_quality.sh", "--cpu-rehearsal", "--tokenizer",
                           str(tokenizer), str(tmp_path / "out")], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_a_tokenizer_without_weights_stops_before_any_image(tmp_path):
    """A folder with config.json but no weights failed at the tokens stage, after the images
    (on a GPU: a minute of the session's device time)."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text(json.dumps({"z_channels": 8}))
    out = run_rehearsal(tmp_path, tokenizer, 300, PYTHON=sys.executable)
    assert out.returncode != 0
    rows = (tmp_path / "out" / "stages.tsv").read_text().splitlines()
    assert [r.split("\t")[:2] for r in rows] == [["env", "0"], ["tokenizer", "1"]], out.stdout
    assert "weights" in (tmp_path / "out" / "tokenizer.log").read_text()


FAKE_PYTHON = """#!/usr/bin/env bash
# python for gpu_quality.sh's stages: every one passes at once, but what FAIL names
[[ $1 == -c ]] && exec "$REAL_PYTHON" "$@"  # the script's own arithmetic
for arg in "$@"; do [[ $arg == run_dir=* ]] && run=${arg#run_dir=}; done
if [[ " $* " == *" bdt/train.py "* && -n $EXPORT ]]; then
  mkdir -p "$run/export" && touch "$run/export/model_config.yaml"
fi
for stage in $FAIL; do [[ " $* " == *" $stage "* ]] && exit 3; done
exit 0
"""


@pytest.mark.parametrize("export", [True, False])
def test_sample_and_evals_run_on_any_export_each_whatever_the_other_did(tmp_path, export):
    """A failing sample stage skipped both evaluations, and a train stage that failed after
    writing its export (a kill in the teardown) skipped all three: the scores the run is for.
    Without an export they are skipped, and the run fails on its train stage."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text("{}")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = run_rehearsal(tmp_path, tokenizer, 60, PYTHON=str(fake), REAL_PYTHON=sys.executable,
                        FAIL="bdt/train.py sample", EXPORT="1" if export else "")
    assert out.returncode != 0
    rows = [r.split("\t")[:2] for r in (tmp_path / "out" / "stages.tsv").read_text().splitlines()]
    after = [["sample", "3"], ["eval_s0", "0"], ["eval_s1", "0"]] if export else []
    assert rows == [["env", "0"], ["tokenizer", "0"], ["images", "0"], ["tokens", "0"],
                    ["train", "3"], *after], out.stdout
    assert ("sample and eval skipped" in out.stdout) is not export
