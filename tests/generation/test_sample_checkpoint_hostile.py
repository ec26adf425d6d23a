"""Sampling from a checkpoint dir refuses a damaged or hostile one before building anything,
with an OSError naming the file (`bdt sample` prints it as one line): the files it reads must be
the ones the marker lists, inside the directory, and hold named tensors."""

import json
import shutil
import zipfile

import pytest
import torch

from bdt.generation.run_weights import MODEL_STATES, checkpoint_weights
from bdt.training.checkpoint import MARKER, CheckpointManager, tag_for
from bdt.training.integrity import digest_all
from bdt.training.distributed import DistInfo

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _relist(ck):
    marker = json.loads((ck / MARKER).read_text())
    marker["files"] = digest_all(str(ck), skip=set())
    (ck / MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete checkpoint holding DeepSpeed's module-states file and an EMA, built once."""
    root = tmp_path_factory.mktemp("built") / "ck"
    CheckpointManager(str(root), SOLO).save(
        1, engines={}, rank_meta={}, shared={"ema": {"shadow": {"w": torch.ones(2)}}})
    ck = root / tag_for(1)
    (ck / "model").mkdir()
    torch.save({"module": {"w": torch.zeros(2)}}, ck / MODEL_STATES)
    _relist(ck)
    return ck


def test_the_average_takes_the_dtype_of_the_weights_it_replaces(tmp_path):
    """A bf16 run's export holds its fp32 EMA rounded into the bf16 parameters: sampling the
    checkpoint must round it alike, or it draws other images than the export."""
    root = tmp_path / "ck"
    shadow = torch.tensor([1.0 + 2 ** -10, 3.0])  # the first is not a bf16 value
    CheckpointManager(str(root), SOLO).save(
        1, engines={}, rank_meta={}, shared={"ema": {"shadow": {"w": shadow}}})
    ck = root / tag_for(1)
    (ck / "model").mkdir()
    torch.save({"module": {"w": torch.zeros(2, dtype=torch.bfloat16)}}, ck / MODEL_STATES)
    _relist(ck)
    w = checkpoint_weights(str(ck))["w"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, shadow.to(torch.bfloat16))


def _flip(ck, outside):
    data = bytearray((ck / MODEL_STATES).read_bytes())
    data[-30] ^= 0xFF
    (ck / MODEL_STATES).write_bytes(bytes(data))


def _link_shared(ck, outside):
    shutil.copyfile(ck / "shared.pt", outside)
    (ck / "shared.pt").unlink()
    (ck / "shared.pt").symlink_to(outside)


def _marker(**fields):
    def change(ck, outside):
        (ck / MARKER).write_text(json.dumps({**json.loads((ck / MARKER).read_text()), **fields}))
    return change


def _unlist(name):
    def change(ck, outside):
        marker = json.loads((ck / MARKER).read_text())
        del marker["files"][name]
        (ck / MARKER).write_text(json.dumps(marker))
    return change


def _replace(name, value):
    def change(ck, outside):
        torch.save(value, ck / name)
        _relist(ck)  # written by someone who also rewrote the marker
    return change


def _deflate(name):
    """The file's zip records deflated (torch.load inflates them; torch.save never writes them):
    a few MB of such records can claim many GB."""
    def change(ck, outside):
        with zipfile.ZipFile(ck / name) as plain, \
                zipfile.ZipFile(outside, "w", zipfile.ZIP_DEFLATED) as packed:
            for info in plain.infolist():
                packed.writestr(info.filename, plain.read(info))
        shutil.copyfile(outside, ck / name)
        _relist(ck)
    return change


CASES = {
    "module states damaged": (_flip, f"{MODEL_STATES}: sha256 differs"),
    "shared.pt a symlink outside": (_link_shared, "shared.pt: a symlink"),
    "shared.pt not listed": (_unlist("shared.pt"), "shared.pt: not listed in the marker"),
    "module states not listed": (_unlist(MODEL_STATES), f"lists no {MODEL_STATES}"),
    "marker nested deeply": (lambda ck, o: (ck / MARKER).write_text("[" * 100_000),
                             "marker cannot be read"),
    "marker lists a file outside": (_marker(files={"../../x.pt": {"bytes": 1, "sha256": "x"}}),
                                    "lists file name '../../x.pt', not a plain relative path"),
    "marker files a list": (_marker(files=[MODEL_STATES]), "'files' is list"),
    "module a list": (_replace(MODEL_STATES, {"module": [torch.ones(1)]}),
                      "'module' entry is not a dict of named tensors"),
    "states a tensor": (_replace(MODEL_STATES, torch.ones(1)),
                        "'module' entry is not a dict of named tensors"),
    "states listed but missing": (lambda ck, o: (ck / MODEL_STATES).unlink(),
                                  f"{MODEL_STATES}: missing"),
    "module states deflated": (_deflate(MODEL_STATES), f"{MODEL_STATES}: record(s) ["),
    "ema shadow of strings": (_replace("shared.pt", {"ema": {"shadow": {"w": "x"}}}),
                              "'ema.shadow' entry is not a dict of named tensors"),
}


def test_the_built_checkpoint_reads(built):
    weights = checkpoint_weights(str(built))
    assert list(weights) == ["w"] and torch.equal(weights["w"], torch.ones(2))  # the EMA's


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_checkpoint_is_refused_naming_the_file(built, tmp_path, case):
    ck = tmp_path / "ck"
    shutil.copytree(built, ck)
    change, why = CASES[case]
    change(ck, tmp_path / "outside.pt")
    with pytest.raises(OSError) as e:
        checkpoint_weights(str(ck))
    assert why in str(e.value) and str(ck) in str(e.value), str(e.value)
