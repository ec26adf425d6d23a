"""Sharded safetensors (`<name>.safetensors.index.json` + `<name>-0000K-of-0000N.safetensors`, as
huggingface_hub writes them) read through bdt.weights.read_safetensors like one file, and an
index that disagrees with its shards, or names a file outside its folder, fails naming the
problem."""

import json
import os
import re

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from bdt import storage
from bdt.weights import read_safetensors, safetensors_files

NAME = "weights.safetensors"
INDEX = NAME + ".index.json"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"block.{i}.weight": torch.randn(8, 16, generator=g) for i in range(4)}


@pytest.fixture
def sharded(tmp_path):
    """A folder with `weights.safetensors` sharded in 4 (one tensor = 512 bytes per shard)."""
    save_torch_state_dict(_tensors(), tmp_path, filename_pattern="weights{suffix}.safetensors",
                          max_shard_size=600)
    assert not (tmp_path / NAME).exists()
    return tmp_path


def _index(folder) -> dict:
    return json.loads((folder / INDEX).read_text())


def _write_index(folder, weight_map: dict) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_same(state, expected) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("mmap", [False, True])
def test_sharded_file_reads_like_one_file(sharded, mmap):
    shards = sorted({*_index(sharded)["weight_map"].values()})
    assert len(shards) == 4
    _assert_same(read_safetensors(str(sharded / NAME), mmap=mmap), _tensors())
    _assert_same(read_safetensors(str(sharded / INDEX), mmap=mmap), _tensors())
    assert sorted(safetensors_files(str(sharded / NAME))) == sorted(
        [str(sharded / INDEX), *(str(sharded / s) for s in shards)])


def test_the_unsharded_file_wins_over_an_index(sharded):
    save_file({"only": torch.ones(2)}, sharded / NAME)
    assert list(read_safetensors(str(sharded / NAME))) == ["only"]
    assert safetensors_files(str(sharded / NAME)) == [str(sharded / NAME)]


def test_neither_file_nor_index_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_safetensors(str(tmp_path / NAME))
    with pytest.raises(FileNotFoundError, match=re.escape(INDEX)):
        safetensors_files(str(tmp_path / NAME))


def test_a_missing_shard_is_named(sharded):
    shard = _index(sharded)["weight_map"]["block.2.weight"]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(INDEX)}: 1 shard file.* missing "
                                                rf"\[{re.escape(shard)}\]"):
        read_safetensors(str(sharded / NAME))


def test_a_listed_key_its_shard_lacks_is_named(sharded):
    weight_map = _index(sharded)["weight_map"]
    weight_map["block.9.weight"] = weight_map["block.0.weight"]
    _write_index(sharded, weight_map)
    with pytest.raises(ValueError, match=rf"key\(s\) it lists in {re.escape(weight_map['block.0.weight'])}"
                                         r" are not in that file \[block\.9\.weight\]"):
        read_safetensors(str(sharded / NAME))


def test_a_key_in_two_shards_is_named(sharded):
    weight_map = _index(sharded)["weight_map"]
    first, second = weight_map["block.0.weight"], weight_map["block.1.weight"]
    save_file({"block.1.weight": torch.zeros(8, 16), "block.0.weight": torch.zeros(8, 16)},
              sharded / first)  # block.1 now also in the first shard
    with pytest.raises(ValueError, match=re.escape(f"in two shards [block.1.weight ({first} and "
                                                   f"{second})]")):
        read_safetensors(str(sharded / NAME))


def test_a_key_the_index_does_not_list_is_named(sharded):
    weight_map = _index(sharded)["weight_map"]
    save_file({"block.0.weight": torch.zeros(8, 16), "extra": torch.zeros(1)},
              sharded / weight_map["block.0.weight"])
    with pytest.raises(ValueError, match=re.escape("does not list [extra (in ")):
        read_safetensors(str(sharded / NAME))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors",
                                   "sub/../../outside.safetensors", "sub/inner.safetensors",
                                   "..", "sub\\..\\outside.safetensors"])
def test_a_shard_outside_the_index_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")  # would be readable
    _write_index(folder, {"w": shard})
    with pytest.raises(ValueError, match=re.escape(f"shard name(s) [{shard}] refused")):
        read_safetensors(str(folder / NAME))
    with pytest.raises(ValueError, match="refused"):
        safetensors_files(str(folder / NAME))


@pytest.mark.parametrize("content, named", [
    ("{not json", "not a valid shard index"),
    ("[1, 2]", "not a shard index"),
    ('{"metadata": {}}', "not a shard index"),
    ('{"weight_map": {}}', "not a shard index"),
    ('{"weight_map": {"w": 3}}', "not a shard index"),
    ('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}', "'w' is listed twice"),
    (b"\xff\xfe", "not a valid shard index"),
    ("[" * 100_000 + "]" * 100_000, "not a valid shard index (maximum recursion depth"),
    ('{"weight_map": {"w": "weights.safetensors.index.json"}}', "a shard is a safetensors file"),
    ('{"weight_map": {"w": "other.safetensors.index.json"}}', "not another shard index"),
])
def test_a_malformed_index_is_named(tmp_path, content, named):
    path = tmp_path / INDEX
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{re.escape(named)}"):
        read_safetensors(str(tmp_path / NAME))


def test_a_sharded_image_tokenizer_loads(tmp_path):
    """bdt.tokenizer.io finds a sharded weights file in a tokenizer folder and at a weights path
    (the release's ae.safetensors, a diffusers port's autoencoder/)."""
    from bdt.tokenizer.io import WEIGHTS_NAME, load_tokenizer
    from testkit import save_tiny_image_tokenizer

    plain = save_tiny_image_tokenizer(str(tmp_path / "plain"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    save_torch_state_dict(state, folder, filename_pattern="model{suffix}.safetensors",
                          max_shard_size=4096)
    assert (folder / (WEIGHTS_NAME + ".index.json")).is_file()
    for source in (str(folder), str(folder / WEIGHTS_NAME)):
        loaded = load_tokenizer(source)
        _assert_same(loaded.state_dict(), plain.state_dict())


def test_a_tokenizer_folders_whole_file_wins_over_a_stale_index(tmp_path):
    """Under the release's name (ae.safetensors) the folder's index was picked first: a stale
    index beside the file loaded other weights, silently."""
    from bdt.tokenizer.io import load_tokenizer
    from testkit import save_tiny_image_tokenizer

    plain = save_tiny_image_tokenizer(str(tmp_path / "plain"))
    other = save_tiny_image_tokenizer(str(tmp_path / "other"), seed=1)
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "ae_config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    save_torch_state_dict({k: v.contiguous() for k, v in other.state_dict().items()}, folder,
                          filename_pattern="ae{suffix}.safetensors", max_shard_size=4096)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()},
              folder / "ae.safetensors")
    _assert_same(load_tokenizer(str(folder)).state_dict(), plain.state_dict())


def test_many_shards_are_found_without_a_request_each(tmp_path, monkeypatch):
    """Whether the shards exist is one listing per folder (one call on S3), not one per shard."""
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(40)}
    save_torch_state_dict(tensors, tmp_path, filename_pattern="weights{suffix}.safetensors",
                          max_shard_size=20)
    assert len({*_index(tmp_path)["weight_map"].values()}) == 40
    probes = []
    monkeypatch.setattr(storage, "exists", lambda url: probes.append(url) or os.path.exists(url))
    _assert_same(read_safetensors(str(tmp_path / NAME)), tensors)
    assert len(probes) <= 2  # the file itself, then its index


@pytest.mark.slow
def test_sharded_weights_read_from_s3(sharded, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    for path in sharded.iterdir():
        fs.put_file(str(path), f"{s3_bucket[5:]}/model/{path.name}")
    url = f"{s3_bucket}/model/{NAME}"
    _assert_same(read_safetensors(url), _tensors())
    assert sorted(safetensors_files(url)) == sorted(f"{s3_bucket}/model/{p.name}"
                                                    for p in sharded.iterdir())
    fs.rm_file(f"{s3_bucket[5:]}/model/{_index(sharded)['weight_map']['block.3.weight']}")
    with pytest.raises(FileNotFoundError, match=r"1 shard file\(s\) it lists are missing"):
        read_safetensors(url)
