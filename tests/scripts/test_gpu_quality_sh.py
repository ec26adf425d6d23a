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


def test_at_128_px_the_third_stage_is_made_trained_and_scored_at_its_size(tmp_path):
    """GPU_QUALITY_PX=128: the 128 family is extracted, trained as stage 2 after the demo's two,
    and the model sampled and scored at 128 px (the run itself: the CPU rehearsal)."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text("{}")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("exit 0\n", 'printf "%s\\n" "$*" >> "$CALLS"\nexit 0\n'))
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    out = run_rehearsal(tmp_path, tokenizer, 60, PYTHON=str(fake), REAL_PYTHON=sys.executable,
                        FAIL="", EXPORT="1", CALLS=str(calls), GPU_QUALITY_PX="128")
    assert out.returncode == 0, out.stdout
    lines = calls.read_text().splitlines()
    tokens = next(line for line in lines if "bench/gpu_data.py" in line)
    assert tokens.endswith("--config configs/extract/demo_128.yaml")
    train = next(line for line in lines if "bdt/train.py" in line)
    assert "--config configs/cluster/gpu_shapes_quality_128.yaml " in train
    work = tmp_path / "work"
    assert f"stages.2.shards={work}/data/tokens/128/*.tar" in train
    assert "eval.width=128 eval.height=128" in train
    scored = [line for line in lines if "bdt.cli sample" in line or "bdt.cli eval" in line]
    assert len(scored) == 3 and all("--size 128 " in line for line in scored), scored


def test_a_size_it_has_no_stages_for_is_refused_before_anything_runs(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text("{}")
    out = run_rehearsal(tmp_path, tokenizer, 60, GPU_QUALITY_PX="256")
    assert out.returncode == 2
    assert "GPU_QUALITY_PX must be 64 or 128, got '256'" in out.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
