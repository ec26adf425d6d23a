"""`bdt model init-tiny`: captions from raw shapes tars -> an LLM dir that loads as a backbone and
whose tokenizer was trained on those captions; bad input exits 2."""

import io
import json
import tarfile

import pytest

from bdt.cli import main
from bdt.model.backbone import load_backbone
from bdt.model.backbone_config import BackboneConfig


def test_init_tiny_from_shapes_tars(tmp_path, capsys):
    data, llm = tmp_path / "data", tmp_path / "llm"
    assert main(["data", "shapes", "--out", str(data), "--num", "40", "--per-shard", "20",
                 "--size", "64", "--seed", "1"]) == 0
    assert main(["model", "init-tiny", "--captions-from", str(data), "--out", str(llm),
                 "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate", "64", "--max-captions", "30", "--vocab-size", "5000"]) == 0
    # The tokens it has: 30 short captions give far fewer pieces than asked (it said 5000).
    tokens = json.loads((llm / "config.json").read_text())["vocab_size"]
    assert tokens < 5000 and f"a caption tokenizer of {tokens} tokens (--vocab-size 5000) from " \
        f"30 captions" in capsys.readouterr().out
    bb = load_backbone(BackboneConfig(path=str(llm)), parallel_num=4)
    assert bb.model.config.hidden_size == 32 and bb.model.config.num_hidden_layers == 1
    # Trained on the captions: shape words are whole pieces, an unseen word is not.
    pieces = bb.tokenizer.tokenize(" circle")
    assert len(pieces) == 1, pieces
    assert len(bb.tokenizer.tokenize(" xylophone")) > 1


def test_init_tiny_skips_bad_captions_naming_them(tmp_path, caplog):
    """A caption that was not UTF-8 ended the command with a bare codec error naming no file,
    and a blank one was trained on as ""."""
    from bdt.commands.model import read_captions

    members = [("a.txt", b"a red circle"), ("a.jpg", b"x" * 4096), ("b.txt", b"caf\xe9"),
               ("c.txt", b" \n"), ("d.txt", b"two\x1bblue squares"), ("e.txt", b"a star"),
               ("f.txt", "\ufeffa blue square\n".encode())]  # as extraction reads it
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level("WARNING", "bdt.commands.model"):
        assert read_captions(str(tmp_path), 10) == ["a red circle", "a star", "a blue square"]
    where = f"in {tmp_path / 'x.tar'}: "
    for key, reason in (("b", "caption_not_utf8 'utf-8' codec can't decode byte 0xe9"),
                        ("c", "empty_caption"), ("d", "caption_control_char U+001B")):
        assert f"skipping the caption of sample {key} {where}{reason}" in caplog.text


def test_init_tiny_without_tars_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "llm")])
    assert code == 2 and "holds no .tar shards" in capsys.readouterr().err


def test_init_tiny_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    """A non-empty --out is refused before any work; --overwrite replaces the files init-tiny
    writes and leaves the others; a killed run's staging folder does not block a rerun."""
    data, llm = tmp_path / "data", tmp_path / "llm"
    assert main(["data", "shapes", "--out", str(data), "--num", "20", "--per-shard", "20",
                 "--size", "64", "--seed", "1"]) == 0
    tiny = ["model", "init-tiny", "--captions-from", str(data), "--out", str(llm), "--hidden",
            "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "16"]
    llm.mkdir()  # an empty folder is a new one
    (llm / ".bdt-staging").mkdir()
    (llm / ".bdt-staging" / "config.json").write_text("{half written")  # a killed run's
    assert main(tiny) == 0
    assert not (llm / ".bdt-staging").exists()
    weights = (llm / "model.safetensors").read_bytes()
    (llm / "notes.txt").write_text("mine")
    (llm / "model.safetensors").write_bytes(b"damaged")
    capsys.readouterr()
    assert main(tiny) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err, err
    assert (llm / "model.safetensors").read_bytes() == b"damaged"  # untouched
    assert main([*tiny, "--overwrite"]) == 0
    assert (llm / "model.safetensors").read_bytes() == weights  # seeded: the same model
    assert (llm / "notes.txt").read_text() == "mine"


def test_init_tiny_refuses_an_out_that_is_no_folder_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "file"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "file exists and is not a directory" in err, err
    assert main(["model", "init-tiny", "--captions-from", str(tmp_path), "--out", ""]) == 2
    assert "the output directory is ''" in capsys.readouterr().err
    # A folder that cannot be made under a file: refused before the captions are even read.
    code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "file" / "deeper" / "llm")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'file'} is not a directory" in err, err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("flag, value, named", [
    ("--vocab-size", "260", "vocab_size 260: the caption tokenizer cannot be trained with it"),
    ("--seed", "-1", "--seed must be in [0, 2^32), got -1"),
])
def test_init_tiny_values_no_tokenizer_or_seed_takes_are_one_line(tmp_path, capsys, flag, value,
                                                                   named):
    """Once a SentencePiece RuntimeError traceback, and a silently accepted negative seed."""
    from bdt.data.shards import generate
    from bdt.data.shapes import ShapesConfig

    generate(ShapesConfig(out=str(tmp_path / "d"), num=4, sizes=["32"]))
    code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "d"), "--out",
                 str(tmp_path / "llm"), "--hidden", "16", "--layers", "1", "--heads", "2",
                 "--kv-heads", "1", "--intermediate", "16", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "llm").exists()
