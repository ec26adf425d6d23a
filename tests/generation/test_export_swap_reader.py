"""load_trained while a run's end swaps its new export in (bdt/training/ar/export.py: one rename
of the whole folder): a reader that opened the model's files before the swap and the image
tokenizer's after loaded a mix of two exports without a word."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bdt.generation import export_reader
from bdt.generation.bitdance_release import import_release
from bdt.generation.load import load_trained
from bdt.model.ar import WEIGHTS_NAME
from bdt.training.ar.export import _replace_dir
from bdt.training.run_dir import EXPORT_IMAGE_TOKENIZER_DIR

from mllm_tiny import write_release


def _rescaled(path) -> None:
    """The safetensors file at `path` with every tensor halved: another training's weights."""
    save_file({k: v * 0.5 for k, v in load_file(path).items()}, path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export "a" and export "b", which differs in the connector/head and the image tokenizer."""
    root = tmp_path_factory.mktemp("export_swap")
    import_release(str(write_release(root / "release")), str(root / "a"))
    shutil.copytree(root / "a", root / "b")
    _rescaled(root / "b" / WEIGHTS_NAME)
    _rescaled(root / "b" / EXPORT_IMAGE_TOKENIZER_DIR / "model.safetensors")
    return root


def _same(loaded, reference) -> bool:
    pairs = [(loaded.model, reference.model), (loaded.decoder, reference.decoder)]
    return all(torch.equal(mine, theirs.state_dict()[key]) for one, theirs in pairs
               for key, mine in one.state_dict().items())


def _swap_before_the_image_tokenizer(monkeypatch, exports, export, swaps: int) -> list[str]:
    """The first `swaps` loads find a new export (b, a, b, ...) swapped in under `export` once the
    model's files are read and before the image tokenizer's are: what a run's end does to a
    reader at the wrong moment."""
    load_decoder, done = export_reader.load_decoder, []

    def swapping(*args, **kwargs):
        if len(done) < swaps:
            src = exports / ("b" if len(done) % 2 == 0 else "a")
            new = shutil.copytree(src, export.parent / f"export.new{len(done)}")
            _replace_dir(str(new), str(export))
            done.append(src.name)
        return load_decoder(*args, **kwargs)

    monkeypatch.setattr(export_reader, "load_decoder", swapping)
    return done


def test_an_export_swapped_in_mid_load_is_loaded_again_whole(exports, tmp_path, monkeypatch):
    reference_b = load_trained(str(exports / "b"))
    assert not _same(load_trained(str(exports / "a")), reference_b)  # the two are told apart
    export = tmp_path / "export"
    shutil.copytree(exports / "a", export)
    done = _swap_before_the_image_tokenizer(monkeypatch, exports, export, swaps=1)
    loaded = load_trained(str(export))
    assert done == ["b"]
    assert _same(loaded, reference_b)  # b's model with b's image tokenizer, not a's with b's


def test_an_export_that_keeps_being_swapped_is_one_clear_error(exports, tmp_path, monkeypatch):
    export = tmp_path / "export"
    shutil.copytree(exports / "a", export)
    done = _swap_before_the_image_tokenizer(monkeypatch, exports, export, swaps=2)
    with pytest.raises(OSError, match=r"^'.*export' was replaced while it loaded, twice: a "
                                      r"training run is exporting to it; load it once that run "
                                      r"has finished$"):
        load_trained(str(export))
    assert done == ["b", "a"]
