"""More flags no command can use: refused with exit 2 and one line naming the flag, before any
model loads or file is written (the model path here need not exist)."""

import pytest

from bdt.cli import main


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("parallel", ["-4", "3", "8"])
def test_parallel_that_is_no_square_is_refused_before_loading(tmp_path, capsys, command, parallel):
    """P = ps * ps tokens per step; a value no model can have is refused before the model's
    (slow) load that used to come first."""
    prompt = ["--prompt", "a red circle"] if command == "sample" else []
    code = main([command, "--model", str(tmp_path / "no_model"), *prompt, "--parallel", parallel,
                 "--out", str(tmp_path / "o")])
    last = _last_error(capsys)
    assert code == 2 and f"--parallel must be 0 (the model's P) or a perfect square, got " \
        f"{parallel}" in last, last
    assert not (tmp_path / "o").exists()


def test_shapes_negative_seed_is_refused_before_writing(tmp_path, capsys):
    """It used to create the output directory, then fail inside numpy with no flag named."""
    out = tmp_path / "shapes"
    code = main(["data", "shapes", "--out", str(out), "--num", "2", "--size", "32",
                 "--seed", "-1"])
    last = _last_error(capsys)
    assert code == 2 and last == "bdt data: error: --seed must be >= 0, got -1", last
    assert not out.exists()


def test_verify_workers_below_one_is_refused(tmp_path, capsys):
    """It was quietly raised to one reader."""
    code = main(["data", "verify", str(tmp_path), "--workers", "0"])
    last = _last_error(capsys)
    assert code == 2 and last == "bdt data: error: --workers must be >= 1, got 0", last


@pytest.mark.parametrize("command", [["data", "shapes", "--num", "2", "--size", "32"],
                                     ["sample", "--model", "M", "--prompt", "a red circle"]])
@pytest.mark.parametrize("out", ["s3:/bucket/run", "gs:bucket/run"])
def test_an_output_url_short_of_a_slash_is_refused(tmp_path, capsys, monkeypatch, command, out):
    """fsspec and the OS took `s3:/bucket/run` for a local folder `s3:`: the shards, images or
    (as checkpoint.dir) checkpoints were written to the local disk, not to the bucket."""
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--out", out])
    last = _last_error(capsys)
    assert code == 2 and f"{out}: looks like a URL short of a '/'" in last, last
    assert list(tmp_path.iterdir()) == []
    assert main(["data", "shapes", "--num", "2", "--size", "32", "--out", f"./{out}"]) == 0


def _npy(array, **kwargs) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def _bad_npy(name: str) -> bytes:
    import io

    import numpy as np

    if name == "objects":
        return _npy(np.zeros((1, 2, 2, 16), object), allow_pickle=True)
    if name == "empty":
        return b""
    header = io.BytesIO()  # 64 bytes of data under a header that claims 46 TiB
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**11, 2, 2, 16)})
    return header.getvalue() + bytes(64)


@pytest.mark.parametrize("name, expected", [
    # a header claiming 46 TiB over 64 bytes: np.load allocated first (a MemoryError traceback)
    ("bomb", "npy data holds 64 bytes, its header says (100000000000, 2, 2, 16) uint8"),
    ("empty", "EOF: reading magic string"),  # was an EOFError traceback
    ("objects", "npy data of Python objects: refused"),
])
def test_tokenizer_decode_refuses_a_bad_npy_naming_it(tmp_path, capsys, name, expected):
    from testkit import save_tiny_image_tokenizer

    save_tiny_image_tokenizer(str(tmp_path / "tok"), 16)
    bits = tmp_path / f"{name}.npy"
    bits.write_bytes(_bad_npy(name))
    code = main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), "--bits", str(bits),
                 "--out", str(tmp_path / "o")])
    last = _last_error(capsys)
    assert code == 2 and last.startswith(f"bdt tokenizer: error: {bits}: not a plain .npy "
                                          f"array: ") and expected in last, last
    assert not (tmp_path / "o").exists()
