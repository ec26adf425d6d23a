"""Bit packing and layouts, tokenizer save/load (local, S3, released forms), the CLI."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from huggingface_hub import save_torch_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

from bdt import cli
from bdt.tokenizer import (BinaryAutoencoder, TokenizerConfig, load_tokenizer, map_to_tokens, pack_bits,
                           save_tokenizer, tokens_to_map, unpack_bits)
from bdt.tokenizer.quantizer import group_indices

from reference import REF, fixture_params, load_fixture, seed_decoder_noise
TINY = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=16)


@pytest.fixture(scope="module")
def tiny_model() -> BinaryAutoencoder:
    torch.manual_seed(0)
    return BinaryAutoencoder(TokenizerConfig(**TINY)).eval()


def _photos(h: int, w: int) -> torch.Tensor:
    """Crops of real photos, B x 3 x h x w in [-1, 1]."""
    crops = [img[100:100 + h, 150:150 + w] for img in (skdata.astronaut(), skdata.coffee())]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("num_bits", [8, 16, 32, 256])
def test_pack_unpack_round_trip_numpy_and_torch(num_bits):
    rng = np.random.default_rng(num_bits)
    bits = rng.random((3, 4, 5, num_bits)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 4, 5, num_bits // 8)
    assert np.array_equal(unpack_bits(packed, num_bits), bits)
    packed_t = pack_bits(torch.from_numpy(bits))
    assert packed_t.dtype == torch.uint8 and np.array_equal(packed_t.numpy(), packed)
    assert torch.equal(unpack_bits(packed_t, num_bits), torch.from_numpy(bits))


def test_bit_order_is_lsb_first_and_equals_group_codes():
    bits = np.zeros((1, 32), dtype=bool)
    bits[0, [0, 9, 31]] = True
    assert pack_bits(bits).tolist() == [[1, 2, 0, 128]]
    # With 8-bit groups, packed byte j is the entropy loss's code index of group j.
    rand = torch.rand(50, 32) < 0.5
    assert torch.equal(pack_bits(rand).long(), group_indices(rand, 8))


def test_pack_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 8.*got 12"):
        pack_bits(np.zeros((2, 12), dtype=bool))
    with pytest.raises(ValueError, match="2 bytes, expected 4"):
        unpack_bits(np.zeros((1, 2), dtype=np.uint8), 32)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(np.zeros((1, 4), dtype=np.int64), 32)


TINY_TENSORS = load_file(REF / "tokenizer_tiny.safetensors")


@pytest.mark.parametrize("ps", sorted(int(k[len("io.tokens_ps"):]) for k in TINY_TENSORS
                                      if k.startswith("io.tokens_ps")))
def test_token_order_matches_released_vt_forward(ps):
    bits_BhwC = TINY_TENSORS["io.bits"].permute(0, 2, 3, 1)
    _, h, w, C = bits_BhwC.shape
    tokens = map_to_tokens(bits_BhwC, ps)
    assert torch.equal(tokens.reshape(-1, C), TINY_TENSORS[f"io.tokens_ps{ps}"])
    assert torch.equal(tokens_to_map(tokens, h, w, ps), bits_BhwC)
    as_np = map_to_tokens(bits_BhwC.numpy(), ps)
    assert np.array_equal(as_np, tokens.numpy())
    assert np.array_equal(tokens_to_map(as_np, h, w, ps), bits_BhwC.numpy())


def test_non_square_token_layout_round_trip():
    bits = torch.rand(2, 4, 6, 8) < 0.5
    for ps in (1, 2):
        assert torch.equal(tokens_to_map(map_to_tokens(bits, ps), 4, 6, ps), bits)
    first_patch = map_to_tokens(bits, 2)[:, :4]
    assert torch.equal(first_patch, bits[:, :2, :2].reshape(2, 4, 8))
    with pytest.raises(ValueError, match="4x6 is not divisible by the patch side 4"):
        map_to_tokens(bits, 4)


def _assert_same_outputs(a: BinaryAutoencoder, b: BinaryAutoencoder) -> None:
    images = _photos(32, 48)
    bits = a.encode(images)
    assert torch.equal(bits, b.encode(images))
    assert torch.equal(a.decode(bits), b.decode(bits))


def test_save_load_round_trip_local(tmp_path, tiny_model):
    save_tokenizer(tiny_model, str(tmp_path / "tok"))
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.config == tiny_model.config and not loaded.training
    _assert_same_outputs(tiny_model, loaded)
    as_bf16 = load_tokenizer(str(tmp_path / "tok"), dtype=torch.bfloat16)
    assert next(as_bf16.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_save_load_round_trip_s3(s3_bucket, tiny_model):
    url = f"{s3_bucket}/tokenizers/tiny"
    save_tokenizer(tiny_model, url)
    _assert_same_outputs(tiny_model, load_tokenizer(url))


def test_released_layout_directory_and_torch_file(tmp_path):
    """A directory as the official release ships it: nested ddconfig + weights of another name."""
    meta, t = load_fixture("tokenizer_tiny")
    state = fixture_params(t)
    for weights_name, write in [("ae_tiny.safetensors", save_file),
                                ("ae_tiny.pt", lambda sd, p: torch.save({"state_dict": sd}, p))]:
        folder = tmp_path / weights_name.replace(".", "_")
        folder.mkdir()
        (folder / "ae_tiny_config.json").write_text(json.dumps(meta["constructor_args"]))
        write(state, str(folder / weights_name))
        model = load_tokenizer(str(folder))
        assert torch.equal(model.encode(t["io.input"]), (t["io.bits"] > 0).permute(0, 2, 3, 1))
        seed_decoder_noise(meta)
        torch.testing.assert_close(model.decode(model.encode(t["io.input"])), t["io.recon"],
                                   atol=1e-5, rtol=1e-5)
    # A bare weights file: config given explicitly, or found by the release's `<stem>_config.json`.
    model = load_tokenizer(str(tmp_path / "ae_tiny_pt" / "ae_tiny.pt"), config=meta["constructor_args"])
    assert model.bits_per_token == meta["constructor_args"]["ddconfig"]["z_channels"]
    model = load_tokenizer(str(tmp_path / "ae_tiny_safetensors" / "ae_tiny.safetensors"))
    assert torch.equal(model.encode(t["io.input"]), (t["io.bits"] > 0).permute(0, 2, 3, 1))
    # Sharded: the index's path finds the config its weights would (ae_tiny_config.json).
    sharded = tmp_path / "ae_tiny_sharded"
    sharded.mkdir()
    save_torch_state_dict(state, sharded, filename_pattern="ae_tiny{suffix}.safetensors",
                          max_shard_size=10_000)
    (sharded / "ae_tiny_config.json").write_text(json.dumps(meta["constructor_args"]))
    model = load_tokenizer(str(sharded / "ae_tiny.safetensors.index.json"))
    assert torch.equal(model.encode(t["io.input"]), (t["io.bits"] > 0).permute(0, 2, 3, 1))
    # Two weights files and no model.safetensors: ambiguous, say so.
    save_file(state, str(tmp_path / "ae_tiny_safetensors" / "other.safetensors"))
    with pytest.raises(ValueError, match=r"several candidate weights files \['ae_tiny.safetensors', "
                                         r"'other.safetensors'\]"):
        load_tokenizer(str(tmp_path / "ae_tiny_safetensors"))


@pytest.mark.parametrize("config", [b'{"ch": "caf\xe9"}', b"[" * 100000])
def test_a_config_that_is_not_json_names_the_file(tmp_path, tiny_model, config):
    """Not UTF-8 was a bare codec error naming no file, nesting a RecursionError traceback."""
    save_tokenizer(tiny_model, str(tmp_path / "tok"))
    (tmp_path / "tok" / "config.json").write_bytes(config)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'tok' / 'config.json'}: not valid JSON: "):
        load_tokenizer(str(tmp_path / "tok"))


def test_torch_file_with_code_is_refused(tmp_path, tiny_model):
    folder = tmp_path / "unsafe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    torch.save({"state_dict": tiny_model.state_dict(), "extra": TokenizerConfig()}, folder / "w.pt")
    with pytest.raises(ValueError, match="weights-only torch file") as err:
        load_tokenizer(str(folder))
    # The reason, not torch's advice to load it again unsafely (which was all its first line said).
    assert "TokenizerConfig" in str(err.value) and "weights_only` set to `False" not in str(err.value)


def test_torch_file_with_compressed_records_is_refused(tmp_path, tiny_model):
    """torch.load inflates a deflated record, so a few MB of zeros could claim (and allocate)
    many GB; torch.save never compresses, so such a file is refused before torch reads it."""
    folder = tmp_path / "packed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    torch.save(tiny_model.state_dict(), tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as plain, \
            zipfile.ZipFile(folder / "w.pt", "w", zipfile.ZIP_DEFLATED) as packed:
        for info in plain.infolist():
            packed.writestr(info.filename, plain.read(info))
    assert torch.load(folder / "w.pt", weights_only=True).keys() == tiny_model.state_dict().keys()
    with pytest.raises(ValueError, match=r"w\.pt: cannot read as a weights-only torch file: "
                                         r"record\(s\) \[.*\] are compressed"):
        load_tokenizer(str(folder))


def test_wrong_shapes_and_missing_keys_are_named(tmp_path, tiny_model):
    save_tokenizer(BinaryAutoencoder(TokenizerConfig(**{**TINY, "z_channels": 8, "entropy_group_size": 8})),
                   str(tmp_path / "z8"))
    config = tiny_model.config.to_dict()
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.conv_out\.weight: expected \[16, 64, 1, 1\] "
                                         r"got \[8, 64, 1, 1\]"):
        load_tokenizer(str(tmp_path / "z8" / "model.safetensors"), config=config)
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("decoder.adaptive.1.")}
    state["encoder.extra.weight"] = torch.zeros(1)
    (tmp_path / "cut").mkdir()
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_tokenizer(str(tmp_path / "cut"))
    message = str(err.value)
    assert "4 missing key(s) [decoder.adaptive.1.gamma.weight" in message
    assert "1 unexpected key(s) [encoder.extra.weight]" in message
    assert "z_channels=16" in message


@pytest.mark.parametrize("edit, named", [
    (lambda sd: {**sd, "encoder.conv_out.bias": sd["encoder.conv_out.bias"] * float("nan")},
     r"1 tensor\(s\) with NaN or inf values \[encoder\.conv_out\.bias\]"),
    (lambda sd: {**sd, "decoder.conv_out.bias": sd["decoder.conv_out.bias"].long()},
     r"non-float tensor\(s\) for float parameters \[decoder\.conv_out\.bias: torch\.int64\]"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, r"extra prefix 'module\.'"),
])
def test_weights_that_would_compute_garbage_are_named(tmp_path, tiny_model, edit, named):
    (tmp_path / "tok").mkdir()
    save_file(edit(tiny_model.state_dict()), str(tmp_path / "tok" / "model.safetensors"))
    (tmp_path / "tok" / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    with pytest.raises(ValueError, match=r"tok/model\.safetensors does not fit.*" + named):
        load_tokenizer(str(tmp_path / "tok"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_tokenizer(str(tmp_path / "empty"))


def test_cli_encode_decode_end_to_end(tmp_path, tiny_model, capsys):
    assert "bdt.commands.tokenizer" in cli.COMMAND_MODULES
    tok = str(tmp_path / "tok")
    save_tokenizer(tiny_model, tok)
    images = _photos(32, 48)
    paths = []
    for i, img in enumerate(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(img).save(paths[-1])
    out = str(tmp_path / "bits.npy")
    assert cli.main(["tokenizer", "encode", "--tokenizer", tok, "--images", *paths, "--out", out,
                     "--batch-size", "1"]) == 0
    bits = np.load(out, allow_pickle=False)
    assert bits.dtype == np.uint8 and bits.shape == (2, 8, 12, 16)
    # PNG pixels are exactly the uint8 values, so the CLI sees the same input as the model here.
    assert np.array_equal(bits, tiny_model.encode(images).numpy().astype(np.uint8))
    assert cli.main(["tokenizer", "decode", "--tokenizer", tok, "--bits", out, "--out",
                     str(tmp_path / "pngs")]) == 0
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == ["000000.png", "000001.png"]
    decoded = np.asarray(Image.open(pngs[1]))
    expected = ((tiny_model.decode(torch.from_numpy(bits[1:2]).bool()).clamp(-1, 1) + 1) * 127.5).round()
    assert decoded.shape == (32, 48, 3)
    assert np.array_equal(decoded, expected[0].permute(1, 2, 0).byte().numpy())


def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, tiny_model, capsys):
    tok = str(tmp_path / "tok")
    save_tokenizer(tiny_model, tok)
    Image.fromarray(np.zeros((30, 32, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    assert cli.main(["tokenizer", "encode", "--tokenizer", tok, "--images", str(tmp_path / "odd.png"),
                     "--out", str(tmp_path / "b.npy")]) == 2
    assert "image size 30x32 (HxW) is not divisible by the tokenizer's downsample factor 4" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((1, 2, 2, 32), dtype=np.uint8))
    assert cli.main(["tokenizer", "decode", "--tokenizer", tok, "--bits", str(tmp_path / "wide.npy"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "expected N x h x w x 16 bits, got shape [1, 2, 2, 32]" in capsys.readouterr().err
