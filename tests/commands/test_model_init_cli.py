"""`bdt model init-tiny`: captions from raw shapes tars -> an LLM dir that loads as a backbone and
whose tokenizer was trained on those captions; bad input exits 2."""

from bdt.cli import main
from bdt.model.backbone import BackboneConfig, load_backbone


def test_init_tiny_from_shapes_tars(tmp_path, capsys):
    data, llm = tmp_path / "data", tmp_path / "llm"
    assert main(["data", "shapes", "--out", str(data), "--num", "40", "--per-shard", "20",
                 "--size", "64", "--seed", "1"]) == 0
    assert main(["model", "init-tiny", "--captions-from", str(data), "--out", str(llm),
                 "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate", "64", "--max-captions", "30"]) == 0
    assert "from 30 captions" in capsys.readouterr().out
    bb = load_backbone(BackboneConfig(path=str(llm)), parallel_num=4)
    assert bb.model.config.hidden_size == 32 and bb.model.config.num_hidden_layers == 1
    # Trained on the captions: shape words are whole pieces, an unseen word is not.
    pieces = bb.tokenizer.tokenize(" circle")
    assert len(pieces) == 1, pieces
    assert len(bb.tokenizer.tokenize(" xylophone")) > 1


def test_init_tiny_without_tars_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["model", "init-tiny", "--captions-from", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "llm")])
    assert code == 2 and "holds no .tar shards" in capsys.readouterr().err
