"""`bdt tokenizer decode --out` follows the output rules of `bdt sample` / `bdt eval`: a non-empty
folder (local or on S3) is refused unless --overwrite, and so is a folder that cannot be made,
before the tokenizer loads; the PNGs appear together or not at all (output_dirs.staged_dir)."""

from __future__ import annotations

import numpy as np
import pytest

from bdt import cli, storage
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from testkit import save_tiny_image_tokenizer


@pytest.fixture(scope="module")
def tokenizer_and_bits(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    save_tiny_image_tokenizer(str(root / "tok"), bits=16)
    bits = np.random.default_rng(0).integers(0, 2, size=(2, 4, 4, 16), dtype=np.uint8)
    np.save(root / "bits.npy", bits, allow_pickle=False)
    return str(root / "tok"), str(root / "bits.npy")


def _decode(tokenizer: str, bits: str, out: str, *extra: str) -> int:
    return cli.main(["tokenizer", "decode", "--tokenizer", tokenizer, "--bits", bits, "--out", out,
                     "--batch-size", "1", *extra])


@pytest.mark.parametrize("case", ["non-empty", "under a file"])
def test_a_bad_out_is_refused_before_the_tokenizer_loads(tmp_path, tokenizer_and_bits, capsys,
                                                          case):
    _, bits = tokenizer_and_bits
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    out, named = {"non-empty": (tmp_path / "out", "exists and is not empty: give a new or empty "
                                                  "directory, or pass --overwrite"),
                  "under a file": (tmp_path / "file" / "pngs", "is not a directory")}[case]
    assert _decode(str(tmp_path / "no-tokenizer"), bits, str(out)) == 2
    err = capsys.readouterr().err
    assert named in err and "tokenizer not found" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "notes.txt", "out"]


def test_overwrite_writes_into_a_non_empty_folder(tmp_path, tokenizer_and_bits):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "000001.png").write_text("an older decode")
    assert _decode(*tokenizer_and_bits, str(out), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "notes.txt"]
    assert (out / "000001.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_decode_leaves_no_partial_folder(tmp_path, tokenizer_and_bits, monkeypatch):
    decode, calls = BinaryAutoencoder.decode, []

    def fail_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("decoder broke")
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(BinaryAutoencoder, "decode", fail_on_the_second_batch)
    assert _decode(*tokenizer_and_bits, str(tmp_path / "pngs")) == 2
    assert len(calls) == 2 and sorted(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_remote_out_gets_the_pngs_once_decoded(s3_bucket, tokenizer_and_bits):
    fs, _ = storage.filesystem(s3_bucket)
    assert _decode(*tokenizer_and_bits, s3_bucket + "/pngs") == 0
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_bucket + "/pngs")) == ["000000.png",
                                                                              "000001.png"]
    assert fs.cat(s3_bucket + "/pngs/000000.png").startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tokenizer decode", "sample", "eval"])
def test_a_non_empty_remote_out_is_refused_before_the_model_loads(s3_bucket, tmp_path, capsys,
                                                                  command):
    """The check (output_dirs.refuse_nonempty_dir) runs before any work on S3 as locally."""
    fs, _ = storage.filesystem(s3_bucket)
    fs.pipe(s3_bucket + "/out/notes.txt", b"mine")
    args = {"tokenizer decode": ["--tokenizer", str(tmp_path / "no-model"), "--bits", "b.npy"],
            "sample": ["--model", str(tmp_path / "no-model"), "--prompt", "a red circle"],
            "eval": ["--model", str(tmp_path / "no-model")]}[command]
    assert cli.main([*command.split(), *args, "--out", s3_bucket + "/out"]) == 2
    err = capsys.readouterr().err
    assert f"{s3_bucket}/out exists and is not empty" in err and "no-model" not in err
    assert fs.ls(s3_bucket + "/out", detail=False) == [s3_bucket[5:] + "/out/notes.txt"]


def test_encode_refuses_an_out_it_cannot_write_before_any_work(tmp_path, tokenizer_and_bits, capsys):
    """It once encoded every image and failed only at the final rename."""
    (tmp_path / "out").mkdir()
    code = cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "no-tokenizer"),
                     "--images", str(tmp_path / "none.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory; give the .npy file to write" in err, err
    (tmp_path / "afile").write_text("mine")
    code = cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "no-tokenizer"),
                     "--images", str(tmp_path / "none.png"), "--out", str(tmp_path / "afile/b.npy")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write to {tmp_path / 'afile'}" in err and "no-tokenizer" not in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_decode_refuses_arrays_that_are_no_bits_by_name(tmp_path, tokenizer_and_bits, capsys):
    """A record array or an .npz once ended in a numpy traceback."""
    tokenizer, _ = tokenizer_and_bits
    np.save(tmp_path / "rec.npy", np.zeros((1, 4, 4, 16), dtype=[("a", "u1")]), allow_pickle=False)
    np.savez(tmp_path / "z.npz", bits=np.zeros((1, 4, 4, 16), np.uint8))
    for name, expected in (("rec.npy", "expected one .npy array of 0/1"),
                           ("z.npz", "not a plain .npy array: the magic string is not correct")):
        assert _decode(tokenizer, str(tmp_path / name), str(tmp_path / "o")) == 2
        assert expected in capsys.readouterr().err


def test_encode_reads_images_by_the_training_policy(tmp_path, tokenizer_and_bits, capsys):
    """A 16-bit PNG was clipped by PIL's convert (nearly white) and a decompression bomb was a
    traceback: encode now decodes as the training readers do."""
    from PIL import Image

    tokenizer, _ = tokenizer_and_bits
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    grey8 = eight[..., 0]
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    outs = []
    for name in ("grey8", "grey16"):
        assert cli.main(["tokenizer", "encode", "--tokenizer", tokenizer, "--images",
                         str(tmp_path / f"{name}.png"), "--out", str(tmp_path / f"{name}.npy")]) == 0
        outs.append(np.load(tmp_path / f"{name}.npy"))
    assert np.array_equal(*outs)
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))  # 400M pixels claimed, 60 bytes
    assert cli.main(["tokenizer", "encode", "--tokenizer", tokenizer, "--images",
                     str(tmp_path / "bomb.png"), "--out", str(tmp_path / "b.npy")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height grey pixels, and nothing else."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))
