"""`bdt sample` on a tiny trained run: files, sizes, grid, reproducibility, the run-dir
(checkpoint) path, and bad input failing with exit 2 and one clear line."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from bdt.cli import main
from evalutil import BUCKET, run_bdt
from testkit import save_tiny_image_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "two blue squares", "one green star"]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _sample(model: str, out, *extra: str) -> int:
    return main(["sample", "--model", model, "--size", str(BUCKET[0]), "--steps", "2",
                 "--batch", "2", "--out", str(out), *extra])


def test_sample_writes_one_png_per_prompt_and_a_grid(trained_run, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    # blank lines are not prompts, and an editor's byte-order mark is not part of the first one
    prompts_file.write_text("\ufeff" + "\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    # The installed entry point in a child process, end to end.
    proc = run_bdt("sample", "--model", os.path.join(trained_run, "export"), "--prompts-file",
                   str(prompts_file), "--size", str(BUCKET[0]), "--steps", "2", "--batch", "2",
                   "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert pngs == ["0000.png", "0001.png", "0002.png"]
    for name in pngs:
        assert Image.open(out / name).size == BUCKET
    meta = json.loads((out / "samples.json").read_text())
    assert [m["prompt"] for m in meta["images"]] == PROMPTS
    assert (meta["width"], meta["height"], meta["parallel_num"], meta["seed"]) == (*BUCKET, 4, 3)
    # Grid: 3 cells of 16 px with 4 px padding, one row.
    assert Image.open(out / "grid.png").size == (3 * (16 + 4) + 4, 16 + 8)
    # Reproducible in-process with the same seed and batch; another seed changes the images.
    assert _sample(os.path.join(trained_run, "export"), tmp_path / "again", "--seed", "3",
                   *sum((["--prompt", p] for p in PROMPTS), [])) == 0
    same = [np.array_equal(_pixels(out / n), _pixels(tmp_path / "again" / n)) for n in pngs]
    assert all(same)
    assert _sample(os.path.join(trained_run, "export"), tmp_path / "other", "--seed", "4",
                   *sum((["--prompt", p] for p in PROMPTS), [])) == 0
    assert not all(np.array_equal(_pixels(out / n), _pixels(tmp_path / "other" / n))
                   for n in pngs)


def test_run_dir_without_export_samples_from_its_checkpoint(trained_run, tmp_path):
    """A run dir without export/ loads the newest complete checkpoint (or a named checkpoint
    dir): the same weights as the export written at the end, so the same images."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    assert _sample(str(run), tmp_path / "ckpt", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]) == 0
    assert _sample(os.path.join(trained_run, "export"), tmp_path / "exp", "--prompt", PROMPTS[0],
                   "--prompt", PROMPTS[1]) == 0
    # The checkpoint directory itself works too.
    step_dir = next((run / "checkpoints").glob("step_*"))
    assert _sample(str(step_dir), tmp_path / "step", "--prompt", PROMPTS[0], "--prompt",
                   PROMPTS[1]) == 0
    for name in ("0000.png", "0001.png"):
        assert np.array_equal(_pixels(tmp_path / "ckpt" / name), _pixels(tmp_path / "exp" / name))
        assert np.array_equal(_pixels(tmp_path / "step" / name), _pixels(tmp_path / "exp" / name))


def test_a_damaged_newest_checkpoint_is_passed_over(trained_run, tmp_path, capsys):
    """A run dir whose newest complete checkpoint no longer verifies (a disk error, a bad copy)
    samples from the next older one, as the trainer would resume from it, and says which it
    passed over; when none reads, each one's problem is named (exit 2)."""
    from bdt.generation.run_weights import MODEL_STATES
    from bdt.training.checkpoint import tag_for

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    older = next((run / "checkpoints").glob("step_*"))
    newest = run / "checkpoints" / tag_for(1000)
    shutil.copytree(older, newest)
    states = newest / MODEL_STATES
    states.write_bytes(states.read_bytes()[:-40])
    prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    assert _sample(str(run), tmp_path / "ckpt", *prompts) == 0
    assert f"passing over checkpoint {newest}" in capsys.readouterr().err
    meta = json.loads((tmp_path / "ckpt" / "samples.json").read_text())
    assert meta["model"] == str(older)
    assert _sample(os.path.join(trained_run, "export"), tmp_path / "exp", *prompts) == 0
    for name in ("0000.png", "0001.png"):
        assert np.array_equal(_pixels(tmp_path / "ckpt" / name), _pixels(tmp_path / "exp" / name))
    (older / MODEL_STATES).unlink()
    capsys.readouterr()
    assert _sample(str(run), tmp_path / "none", *prompts) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "none of the 2 complete checkpoints" in last and "missing" in last, last


def _with_backbone_path(run, path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.model.backbone.path = str(path)
    OmegaConf.save(cfg, run / "config.yaml")


def test_a_run_dir_moved_without_its_llm_samples_from_its_checkpoint(trained_run, tmp_path,
                                                                     capsys):
    """A run records its LLM's config and tokenizer (<run>/backbone/) when it starts, so a copy of
    the run dir where the pretrained LLM's folder is absent samples from its checkpoint: the
    export's images. A run without that record names the missing folder (exit 2)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    assert (run / "backbone" / "config.json").is_file()
    assert not list((run / "backbone").glob("*.safetensors"))  # no weights: the checkpoint's
    _with_backbone_path(run, tmp_path / "moved_llm")
    prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    assert _sample(str(run), tmp_path / "ckpt", *prompts) == 0
    assert _sample(os.path.join(trained_run, "export"), tmp_path / "exp", *prompts) == 0
    for name in ("0000.png", "0001.png"):
        assert np.array_equal(_pixels(tmp_path / "ckpt" / name), _pixels(tmp_path / "exp" / name))
    shutil.rmtree(run / "backbone")
    assert _sample(str(run), tmp_path / "old", *prompts) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds no backbone/ record" in last and str(tmp_path / "moved_llm") in last, last


def test_sample_refuses_a_non_empty_out_unless_overwrite(trained_run, tmp_path, capsys):
    """A non-empty --out is refused before the model loads; --overwrite replaces the files of the
    same names and leaves the others."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (out / "0000.png").write_text("old")
    model = os.path.join(trained_run, "export")
    assert _sample(model, out, "--prompt", PROMPTS[0]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "0000.png").read_text() == "old"
    assert _sample(model, out, "--prompt", PROMPTS[0], "--overwrite") == 0
    assert Image.open(out / "0000.png").size == BUCKET and (out / "mine.txt").read_text() == "keep"
    assert json.loads((out / "samples.json").read_text())["images"][0]["prompt"] == PROMPTS[0]
    assert not [p for p in out.iterdir() if p.name.startswith(".bdt-staging")]


def _incomplete_export(trained_run, tmp_path, name: str) -> str:
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(trained_run, "export"), broken)
    os.remove(broken / name)
    return str(broken)


def test_an_export_with_a_sentencepiece_vocabulary_instead_of_tokenizer_json_samples(
        trained_run, tmp_path):
    """Either vocabulary file will do: only an export with neither is refused (test below)."""
    export = _incomplete_export(trained_run, tmp_path, "llm/tokenizer.json")
    shutil.copy(os.path.join(os.path.dirname(trained_run), "llm", "tokenizer.model"),
                os.path.join(export, "llm"))
    assert main(["sample", "--model", export, "--prompt", "a red circle", "--size", "16",
                 "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "0000.png").is_file()


@pytest.mark.parametrize("case, args, expected", [
    ("missing", ["--size", "16"], "does not exist"),
    ("remote", ["--size", "16"], "is remote: sampling reads a local export"),
    ("incomplete", ["--size", "16"], "missing bitdance_extra.safetensors"),
    # it once blamed the weights: "the tokenizer does not belong to these weights"
    ("incomplete_llm", ["--size", "16"], "missing llm/tokenizer_config.json"),
    # once transformers' "Couldn't instantiate the backend tokenizer from one of: ..."
    ("no_vocabulary", ["--size", "16"],
     "missing llm/tokenizer.json (or tokenizer.model, vocab.json, vocab.txt)"),
    ("export", ["--size", "32"], "bucket 32x32 was not trained"),
    ("export", ["--bucket", "18x16"], "sides must be multiples of 4 px"),
    ("export", ["--bucket", "16by16"], "expected S or WxH"),
    ("export", ["--size", "16", "--parallel", "16"], "trained with P = 4"),
    ("empty_file", ["--size", "16"], "holds no prompt"),
    # Every prompt is checked before the first batch samples, and named as the user gave it
    # (once "prompt 1", counted from 0, beside "--prompt number 2 is empty" for the same place).
    ("export", ["--size", "16", "--batch", "1", "--prompt", "red " * 600],
     "--prompt number 2: 60"),
    ("long_file", ["--size", "16", "--batch", "1"], "prompts.txt line 3: 60"),
    ("export", ["--size", "16", "--prompt", " "], "--prompt number 2 is empty"),
    ("export", ["--size", "16", "--steps", str(10**20)], "--steps must be in [1, 10000]"),
    # finite, but the guided velocity overflows: once a FloatingPointError traceback
    ("export", ["--size", "16", "--steps", "2", "--cfg-scale", "1e38"], "produced NaN or inf"),
])
def test_bad_input_exits_2_with_one_line(trained_run, tmp_path, capsys, case, args, expected):
    model = {"missing": str(tmp_path / "nope"), "remote": "s3://bucket/run/export"}.get(case)
    if case.startswith("incomplete") or case == "no_vocabulary":
        model = _incomplete_export(trained_run, tmp_path, {
            "incomplete_llm": "llm/tokenizer_config.json", "no_vocabulary": "llm/tokenizer.json",
        }.get(case, "bitdance_extra.safetensors"))
    model = model or os.path.join(trained_run, "export")
    source = ["--prompt", "a red circle"]
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("\n  \n")
        source = ["--prompts-file", str(tmp_path / "empty.txt")]
    if case == "long_file":  # a blank line: its prompt 2 is on line 3
        (tmp_path / "prompts.txt").write_text("a red circle\n\n" + "red " * 600 + "\n")
        source = ["--prompts-file", str(tmp_path / "prompts.txt")]
    code = main(["sample", "--model", model, *source, *args, "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith("bdt sample: error: ") and expected in last, last
    assert not (tmp_path / "o").exists()  # failed before writing anything


@pytest.mark.parametrize("content, expected", [
    ("bogus_key: 1\n", "model_config.yaml: key 'bogus_key'"),
    ("", "model_config.yaml: holds no model config"),
    ("pos_max_len: 0\n", "model_config.yaml: model.pos_max_len must be in [1, 16384], got 0"),
    ("parallel_num: [\n", "model_config.yaml: cannot parse YAML"),
    # resolved, it put this machine's environment (MY_SECRET's value) in the config and errors
    ("backbone:\n  path: ${oc.env:MY_SECRET}\n",
     "model_config.yaml: key 'backbone.path' is an interpolation"),
    ("TRAIN_CONFIG", "train_config.yaml: key 'stages.0.shards' is an interpolation"),
])
def test_a_damaged_export_config_is_one_line_naming_it(trained_run, tmp_path, capsys, monkeypatch,
                                                       content, expected):
    """These once gave omegaconf tracebacks, or silently built a model of the default shape."""
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(trained_run, "export"), broken)
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    if content == "TRAIN_CONFIG":  # e.g. shards: s3://their-bucket/${oc.env:AWS_SECRET_ACCESS_KEY}
        record = (broken / "train_config.yaml").read_text()
        shards = record.split("shards: ", 1)[1].split("\n", 1)[0]
        (broken / "train_config.yaml").write_text(
            record.replace(f"shards: {shards}", "shards: /data/${oc.env:MY_SECRET}", 1))
    else:
        (broken / "model_config.yaml").write_text(content)
    code = main(["sample", "--model", str(broken), "--prompt", "a red circle", "--size", "16",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("bdt sample: error: ") and expected in last, last
    assert "s3cr3t" not in err


@pytest.mark.parametrize("p, edit_record, record, expected", [
    (1, False, True, "the model was trained with 4 ("),
    (16, False, True, "the model was trained with 4"),
    (16, True, True, "holds the query tokens of P = 4"),  # record edited too: the tokens tell
    (1, False, False, "holds the query tokens of P = 4"),  # no training record (an import)
])
def test_an_edited_parallel_num_is_refused(trained_run, tmp_path, capsys, p, edit_record, record,
                                           expected):
    """An export's model_config.yaml edited to another P (tokens per AR step) sampled garbage
    without a word: added query tokens with untrained embeddings, or fewer tokens per step than
    the head learnt."""
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(trained_run, "export"), edited)
    for name in ["model_config.yaml"] + (["train_config.yaml"] if edit_record else []):
        text = (edited / name).read_text()
        assert "parallel_num: 4\n" in text
        (edited / name).write_text(text.replace("parallel_num: 4\n", f"parallel_num: {p}\n"))
    if not record:
        (edited / "train_config.yaml").unlink()
    code = main(["sample", "--model", str(edited), "--prompt", "a red circle", "--size", "16",
                 "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "parallel_num is" in last and expected in last, last
    assert not (tmp_path / "o").exists()


def test_a_run_dir_with_an_edited_parallel_num_is_refused(trained_run, tmp_path, capsys):
    """The same for a run dir sampled from its checkpoint: its LLM record holds the query tokens
    of the P it trained with."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("parallel_num: 4\n", "parallel_num: 16\n"))
    code = main(["sample", "--model", str(run), "--prompt", "a red circle", "--size", "16",
                 "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "model.parallel_num is 16" in last and "P = 4" in last, last


def test_an_edited_llm_config_is_refused_naming_the_fields(trained_run, tmp_path, capsys):
    """An export's llm/config.json edited after training (a sliding window: no weight changes
    shape) sampled another model without a word. A field that changes nothing
    (dtype: bdt's config chooses it) may differ; a record made the same lets an edit through."""
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(trained_run, "export"), edited)
    config = json.loads((edited / "llm" / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] and config["sliding_window"] is None
    config.update(layer_types=["sliding_attention"], sliding_window=2, dtype="bfloat16")
    (edited / "llm" / "config.json").write_text(json.dumps(config))
    args = ["sample", "--model", str(edited), "--prompt", "a red circle", "--size", "16",
            "--steps", "2"]
    code = main([*args, "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and 'layer_types is ["sliding_attention"], saved as ["full_attention"]; ' \
        'sliding_window is 2, saved as null.' in last, last
    assert "dtype" not in last and not (tmp_path / "o").exists()
    shutil.copy(edited / "llm" / "config.json", edited / "llm_config_as_saved.json")
    assert main([*args, "--out", str(tmp_path / "o")]) == 0


def test_the_trained_buckets_do_not_depend_on_the_working_directory(trained_run, tmp_path,
                                                                   monkeypatch):
    """The export records its stages' shards as absolute paths (relative ones named another
    folder from another working directory); a damaged record only turns the check off."""
    from omegaconf import OmegaConf

    export = os.path.join(trained_run, "export")
    record = OmegaConf.load(os.path.join(export, "train_config.yaml"))
    assert all(os.path.isabs(stage.shards) for stage in record.stages)
    monkeypatch.chdir(tmp_path)
    assert _sample(export, tmp_path / "o", "--prompt", "a red circle") == 0
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    (copy / "train_config.yaml").write_text("stages: 5\n")
    assert main(["sample", "--model", str(copy), "--prompt", "x", "--size", "32", "--steps", "1",
                 "--out", str(tmp_path / "o2")]) == 0  # 32 px was not trained: unknown now


def test_a_run_dir_naming_its_shards_relatively_refuses_an_untrained_bucket(trained_run, tmp_path,
                                                                          capsys, monkeypatch):
    """A run's config.yaml keeps its shards as the run named them, relative ones too (the demo's
    data.root): sampled from the run dir before its export, the trained-bucket check was off and
    any bucket was sampled; its data.tokenizer is read from the working directory, so are they."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    record = OmegaConf.load(run / "config.yaml")
    for stage in record.stages:
        stage.shards = os.path.relpath(stage.shards, tmp_path)
    OmegaConf.save(record, run / "config.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "run", "--prompt", "x", "--size", "32", "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "bucket 32x32 was not trained" in capsys.readouterr().err
    assert _sample("run", tmp_path / "o", "--prompt", "x") == 0  # the trained one samples


@pytest.mark.parametrize("source", ["export", "run_dir"])
def test_an_image_tokenizer_of_other_bits_is_refused_before_sampling(trained_run, tmp_path, capsys,
                                                                     source):
    """An export whose image_tokenizer/ was replaced, or a run whose data.tokenizer now holds
    another tokenizer, sampled a whole batch and then failed in the decoder's shape check,
    naming no file."""
    from omegaconf import OmegaConf

    other = str(tmp_path / "tok8")
    save_tiny_image_tokenizer(other, bits=8)
    if source == "export":
        model = tmp_path / "export"
        shutil.copytree(os.path.join(trained_run, "export"), model)
        shutil.rmtree(model / "image_tokenizer")
        shutil.copytree(other, model / "image_tokenizer")
        named = model / "image_tokenizer"
    else:
        model = tmp_path / "run"
        shutil.copytree(trained_run, model, ignore=shutil.ignore_patterns("export"))
        cfg = OmegaConf.load(model / "config.yaml")
        cfg.data.tokenizer = other
        OmegaConf.save(cfg, model / "config.yaml")
        named = other
    assert _sample(str(model), tmp_path / "o", "--prompt", PROMPTS[0]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{named}: this image tokenizer decodes 8-bit tokens, the model samples 16-bit" in last
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_a_model_trained_with_a_cuda_only_backend_samples_here(trained_run, tmp_path, backend):
    """A model trained on a GPU with varlen or flash could not be sampled on a CPU (or without
    flash-attn): loading it raised that the backend needs CUDA. Sampling takes 'auto' then, and
    draws the images the model draws with its own backend where that runs."""
    export = tmp_path / "export"
    shutil.copytree(os.path.join(trained_run, "export"), export)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    for name in (export / "model_config.yaml", run / "config.yaml"):
        text, n = re.subn(r"attn_backend: \w+\n", f"attn_backend: {backend}\n", name.read_text())
        assert n == 1
        name.write_text(text)
    prompts = ["--prompt", PROMPTS[0]]
    for model, out in ((export, "from_export"), (run, "from_run"),
                       (os.path.join(trained_run, "export"), "ref")):
        assert _sample(str(model), tmp_path / out, *prompts) == 0
    ref = _pixels(tmp_path / "ref" / "0000.png")
    assert all(np.array_equal(_pixels(tmp_path / d / "0000.png"), ref)
               for d in ("from_export", "from_run"))
