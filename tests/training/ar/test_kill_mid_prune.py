"""A kill while old checkpoints are pruned (rank 0, right after a save's marker) must not leave a
directory that still reads as complete while files its marker lists are gone: such a half-deleted
checkpoint would be offered to resume, reported as damage, and kept for inspection for good."""

import json
import os

import pytest
import torch

from bdt.training import integrity
from bdt.training.checkpoint import CheckpointManager, list_checkpoints, tag_for
from bdt.training.distributed import DistInfo
from bdt.training.integrity import MARKER

FILES = ["model/mp_rank_00_model_states.pt", "model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "rank_00000.json", "rank_00000.safetensors", "zero_to_fp32.py"]


class Killed(BaseException):
    """Stands for the SIGKILL: nothing after it runs."""


def write_checkpoint(root, step: int) -> None:
    """A checkpoint directory as a save leaves it: its files, then the marker listing them."""
    d = root / tag_for(step)
    files = {}
    for rel in FILES:
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{rel} of step {step}".encode() * 100)
        files[rel] = integrity.digest(str(path))
    (d / MARKER).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))


def complete_but_damaged(root) -> list[str]:
    """Directories listed as complete whose marker's files are not all there."""
    out = []
    for _, tag, complete in list_checkpoints(str(root)):
        if complete:
            files = json.loads((root / tag / MARKER).read_text())["files"]
            if not all((root / tag / rel).is_file() for rel in files):
                out.append(tag)
    return out


@pytest.mark.parametrize("deletions_before_kill", range(1, len(FILES) + 1))  # within step 2
def test_a_kill_mid_prune_leaves_no_complete_checkpoint_with_missing_files(
        tmp_path, monkeypatch, deletions_before_kill):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step)
    ckpt = CheckpointManager(str(tmp_path), DistInfo(0, 1, 0, torch.device("cpu")), keep_last=2)
    deleted = []
    real_unlink, real_remove = os.unlink, os.remove

    def dying(real):
        def delete(path, *args, **kwargs):
            if len(deleted) == deletions_before_kill:
                raise Killed
            real(path, *args, **kwargs)
            deleted.append(path)
        return delete

    monkeypatch.setattr(os, "unlink", dying(real_unlink))
    monkeypatch.setattr(os, "remove", dying(real_remove))
    with pytest.raises(Killed):
        ckpt.prune(upto_step=6)
    monkeypatch.undo()
    assert deleted  # the kill landed inside the deletion of step 2
    assert complete_but_damaged(tmp_path) == []
    # what is left of step 2 is incomplete, and the next save's prune removes it
    assert [t for _, t, done in list_checkpoints(str(tmp_path)) if done] == [tag_for(4), tag_for(6)]
    ckpt.prune(upto_step=6)
    assert sorted(os.listdir(tmp_path)) == [tag_for(4), tag_for(6)]
