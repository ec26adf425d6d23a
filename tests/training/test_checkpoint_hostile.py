"""Hostile or damaged checkpoint directories (shared storage, s3:// written by others): resume
passes each over with a reason naming the file, reads and writes nothing outside the checkpoint
directory because of what a checkpoint file says, and never crashes with a raw traceback."""

import json
import os
import shutil

import fsspec
import pytest
import torch

from bdt.training import integrity
from bdt.training.checkpoint import MARKER, CheckpointManager, tag_for
from bdt.training.integrity import digest_all
from bdt.training.distributed import DistInfo

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OLD, NEW = tag_for(1), tag_for(2)


def _save(mgr, step):
    mgr.save(step, engines={}, rank_meta={"step": step}, rank_tensors={"buf": torch.ones(2)},
             shared={"ema": {"w": torch.ones(2)}})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    """A root with two good checkpoints, built once and copied per case."""
    root = str(tmp_path_factory.mktemp("built") / "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=0)
    _save(mgr, 1)
    _save(mgr, 2)
    return root


def _marker(ck):
    return json.loads((ck / MARKER).read_text())


def _write_marker(ck, marker):
    (ck / MARKER).write_text(json.dumps(marker))


def _relist(ck):
    """Re-hash every file into the marker, as a writer who controls the directory would."""
    marker = _marker(ck)
    marker["files"] = digest_all(str(ck), skip=set())
    _write_marker(ck, marker)


def _add_entry(rel):
    """List `rel` with the size and hash of a file outside the checkpoint (which exists)."""
    def change(ck, outside):
        marker = _marker(ck)
        marker["files"][rel] = integrity.digest(str(outside))
        _write_marker(ck, marker)
    return change


def _edit_marker(**fields):
    def change(ck, outside):
        _write_marker(ck, {**_marker(ck), **fields})
    return change


def _entry(value):
    def change(ck, outside):
        marker = _marker(ck)
        marker["files"]["shared.pt"] = value
        _write_marker(ck, marker)
    return change


def _symlink_shared(ck, outside):
    shutil.copyfile(ck / "shared.pt", outside)  # same bytes: only the link gives it away
    (ck / "shared.pt").unlink()
    (ck / "shared.pt").symlink_to(outside)


def _rank_meta(**fields):
    def change(ck, outside):
        meta = json.loads((ck / "rank_00000.json").read_text())
        (ck / "rank_00000.json").write_text(json.dumps({**meta, **fields}))
        _relist(ck)
    return change


def _nested(ck, outside):
    (ck / MARKER).write_text("[" * 100_000 + "]" * 100_000)


# case -> (tampering of the newest checkpoint, text its skip reason must hold)
CASES = {
    "files key with ..": (_add_entry("../../outside.bin"), "not a plain relative path"),
    "files key absolute": (_add_entry("/abs/outside.bin"), "not a plain relative path"),
    "files key with backslash": (_add_entry("..\\outside.bin"), "not a plain relative path"),
    "files key empty": (_add_entry(""), "an empty file name"),
    "symlink to a file outside": (_symlink_shared, "shared.pt: a symlink"),
    "entry a list": (_entry([1, 2]), "shared.pt: its marker entry is list"),
    "entry sha256 an int": (_entry({"bytes": 1, "sha256": 5}), "shared.pt: "),
    "entry bytes a string": (_entry({"bytes": "12", "sha256": "x"}), "shared.pt: "),
    "unlisted extra .pt": (lambda ck, o: (ck / "extra.pt").write_bytes(b"x"),
                           "extra.pt: not listed in the marker"),
    "marker nested deeply": (_nested, "RecursionError"),
    "marker world_size a string": (_edit_marker(world_size="1"), "'world_size' is str"),
    "marker world_size 0": (_edit_marker(world_size=0), "not a positive world size"),
    "marker settings a list": (_edit_marker(settings=["zero_stage"]), "'settings' is list"),
    "marker files a list": (_edit_marker(files=[["shared.pt"]]), "'files' is list"),
    "marker universal a string": (_edit_marker(universal="model"), "'universal' is str"),
    "marker engine name with ..": (_edit_marker(engines=["../model"]),
                                   "engine names ['../model'] are not plain directory names"),
    "marker universal name a path": (_edit_marker(universal=["model/sub"]),
                                     "engine names ['model/sub'] are not plain directory names"),
    "rank file step a string": (_rank_meta(step="2"), "rank_00000.json: 'step' is str"),
    "rank file of another rank": (_rank_meta(rank=3), "do not fit rank 0"),
    "rank file without rng": (_rank_meta(rng={}), "lacks the numpy or python part"),
    "rank file state missing": (_rank_meta(state=None), "'state' is NoneType"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_newest_checkpoint_is_passed_over_naming_why(built, tmp_path, case):
    root = tmp_path / "ck"
    shutil.copytree(built, root, symlinks=True)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    change, why = CASES[case]
    change(root / NEW, outside)
    resumed = CheckpointManager(str(root), SOLO, settings={"zero_stage": 1}).resume({})
    assert resumed.tag == OLD and resumed.meta == {"step": 1}
    assert len(resumed.skipped) == 1 and str(root / NEW) in resumed.skipped[0]
    assert why in resumed.skipped[0], resumed.skipped[0]


def test_an_oversized_marker_is_refused_unparsed(built, tmp_path, monkeypatch):
    root = tmp_path / "ck"
    shutil.copytree(built, root)
    monkeypatch.setattr(integrity, "MARKER_MAX_BYTES", 64)  # both markers are longer
    with pytest.raises(ValueError, match="none was deleted") as e:
        CheckpointManager(str(root), SOLO).resume({})
    assert str(e.value).count("marker cannot be read (ValueError: over 64 bytes)") == 2


def test_only_a_step_directory_counts_and_latest_is_ignored(built, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(built, root)
    shutil.copytree(root / NEW, root / "step_3")  # not step_NNNNNNNNN
    (root / "latest").write_text("../../elsewhere")  # DeepSpeed's pointer: never followed
    assert [t for _, t, _ in CheckpointManager(str(root), SOLO).list_tags()] == [OLD, NEW]
    assert CheckpointManager(str(root), SOLO).resume({}).tag == NEW


def test_a_download_writes_nothing_outside_its_staging_dir(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/hostile-{os.getpid()}/ck/{NEW}"
    fs.pipe(f"{base}/../../escaped.bin", b"x")  # an object key holding '..'
    fs.pipe(f"{base}/rank_00000.json", b"{}")
    staging = tmp_path / "a" / "b" / "staging"
    try:
        mgr = CheckpointManager(f"memory://hostile-{os.getpid()}/ck", SOLO,
                                staging_dir=str(staging))
        local = mgr.fetch_here(NEW)
    finally:
        fs.rm(f"/hostile-{os.getpid()}", recursive=True)
    assert os.listdir(local) == ["rank_00000.json"]
    assert [p.name for p in tmp_path.rglob("escaped.bin")] == []


def test_pruning_a_linked_in_checkpoint_deletes_nothing_of_its_target(built, tmp_path):
    """A checkpoint symlinked in from another root was pruned through the link: its marker, the
    other root's, was deleted, and that root's next prune deleted the checkpoint as incomplete."""
    other = tmp_path / "other"
    shutil.copytree(built, other)
    before = sorted(os.listdir(other / OLD))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / OLD).symlink_to(other / OLD)
    mgr = CheckpointManager(str(mine), SOLO, keep_last=1)
    assert mgr.resume({}).tag == OLD
    _save(mgr, 2)
    assert sorted(os.listdir(mine)) == [NEW]
    assert sorted(os.listdir(other / OLD)) == before and MARKER in before


@pytest.mark.parametrize("target", ["incomplete dir", "nothing"])
def test_a_linked_in_incomplete_checkpoint_at_the_saved_step_is_replaced(built, tmp_path, target):
    """An incomplete checkpoint at the step being saved is a leftover to clear; when it was a
    symlink (to another root's directory, or to nothing) the save failed: rmtree refuses a link,
    and a dangling one blocked the new directory. The link goes alone, its target untouched."""
    other = tmp_path / "other"
    shutil.copytree(built, other)
    (other / NEW / MARKER).unlink()  # incomplete there
    before = sorted(os.listdir(other / NEW))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / NEW).symlink_to(other / NEW if target == "incomplete dir" else tmp_path / "nowhere")
    mgr = CheckpointManager(str(mine), SOLO, keep_last=1)
    _save(mgr, 2)
    assert not (mine / NEW).is_symlink() and (mine / NEW / MARKER).is_file()
    assert mgr.resume({}).tag == NEW
    assert sorted(os.listdir(other / NEW)) == before
