"""A released BitDance model folder -> a bdt export (`bdt model import-bitdance`): built here from
the mllm_tiny fixture's released weights in the release's file layout; the imported model must
reproduce the fixture's losses, sample through `bdt sample`, and bad folders fail with one clear
error that names the file, leaving nothing behind."""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bdt.cli import main
from bdt.generation.bitdance_release import import_release
from bdt.generation.load import load_trained
from bdt.model.ar import BitDanceModel
from bdt.model.keymap import HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS, split_bitdance_state_dict

import mllm_tiny
from mllm_tiny import QWEN3, RELEASED, TENSORS, write_diffusers_port, write_release

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("bitdance_release")
    write_release(out)
    return out


@pytest.fixture(scope="module")
def exported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "export"
    import_release(str(release), str(out))
    return out


def test_imported_model_reproduces_the_release(exported):
    trained = load_trained(str(exported))
    model, cfg = trained.model, mllm_tiny.model_config()
    assert (model.cfg.head, model.cfg.parallel_num) == (cfg.head, cfg.parallel_num)
    ours, vq = split_bitdance_state_dict(RELEASED, cfg.head.mlp)
    state = model.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)
    decoder_state = trained.decoder.state_dict()
    assert decoder_state.keys() == vq.keys()
    for key, value in vq.items():
        torch.testing.assert_close(decoder_state[key], value, atol=0, rtol=0, msg=key)
    # The fixture's forward pass, through the imported model: its losses.
    model.train()
    with torch.no_grad():
        out = model(mllm_tiny.packer().pack(mllm_tiny.samples()),
                    generator=torch.Generator().manual_seed(mllm_tiny.FORWARD_SEED))
    for loss, reference in (("vision", "out.ce_loss_vision"), ("text_ce", "out.ce_loss_text")):
        torch.testing.assert_close(out[loss], TENSORS[reference].mean(), rtol=1e-4, atol=0)


@pytest.mark.slow
def test_import_and_sample_from_the_command_line(release, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["model", "import-bitdance", "--src", str(release), "--out", str(out)]) == 0
    assert "P = 4" in capsys.readouterr().out
    # The LLM's files came along; BitDance's components became bdt's.
    assert (out / "llm" / "tokenizer.json").is_file() and not (out / "llm" / HEAD_WEIGHTS).exists()
    assert main(["sample", "--model", str(out), "--prompt", "w1 w2", "--size", "16", "--steps",
                 "2", "--out", str(tmp_path / "samples")]) == 0
    assert Image.open(tmp_path / "samples" / "0000.png").size == (16, 16)
    # An existing output is never overwritten (S3 outputs: test_import_from_and_to_s3...); a
    # release is not mistaken for an export.
    assert main(["model", "import-bitdance", "--src", str(release), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["sample", "--model", str(release), "--prompt", "w1", "--out",
                 str(tmp_path / "s2")]) == 2
    assert "import-bitdance" in capsys.readouterr().err


def _broken_copy(release, tmp_path, name: str, content) -> str:
    bad = tmp_path / "bad_release"
    shutil.copytree(release, bad)
    if callable(content):
        content(bad)
    elif content is None:
        (bad / name).unlink()
    elif isinstance(content, dict) and name.endswith(".safetensors"):
        save_file(content, bad / name)
    else:
        (bad / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return str(bad)


def _without_query_tokens(folder) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "query" not in t["content"]]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                            unk_token="<|endoftext|>").save_pretrained(folder)


def _llm_as_pickle(folder) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _llm_file_linking_out(folder) -> None:
    (folder.parent / "secret").write_text("PRIVATE KEY")
    (folder / "notes.txt").symlink_to(os.path.join("..", "secret"))


def _head_config(release, **changes) -> dict:
    return {**json.loads((release / HEAD_CONFIG).read_text()), **changes}


@pytest.mark.parametrize("name, content, error, named", [
    (PROJECTOR_WEIGHTS, None, FileNotFoundError, PROJECTOR_WEIGHTS),
    (HEAD_WEIGHTS, "not safetensors", ValueError, HEAD_WEIGHTS),
    (HEAD_CONFIG, "{not json", ValueError, HEAD_CONFIG),
    (HEAD_CONFIG, "[" * 100000, ValueError, f"{HEAD_CONFIG}: not valid JSON (maximum recursion"),
    (HEAD_CONFIG, "wide", ValueError, "shape mismatch"),  # ch_latent 256: head shapes differ
    (HEAD_CONFIG, "cond", ValueError, "ch_cond"),
    (HEAD_CONFIG, "unknown", ValueError, "colour"),
    ("config.json", "int8", ValueError, "config.json: not a Hugging Face causal-LM config"),
    (PROJECTOR_WEIGHTS, "extra key", ValueError, "unexpected key(s) [fc3.weight]"),
    (HEAD_WEIGHTS, "nan", ValueError, "NaN or inf values [net.input_proj.bias]"),
    ("tokenizer.json", "plain tokenizer", ValueError, "lacks 3 of BitDance's tokens"),
    # a float64 1e300 is inf in the model's float32: once imported, and only inf at load
    (HEAD_WEIGHTS, "float64 overflow", ValueError, "NaN or inf values [net.input_proj.bias]"),
    ("model.safetensors", "pickled LLM", ValueError, "has no safetensors weights"),
    ("config.json", "tied but different", ValueError,
     "model.embed_tokens.weight and lm_head.weight differ, but the config ties them"),
    ("config.json", "no dtype", ValueError, "config.json: not a Hugging Face causal-LM config"),
    # a NaN once read as a tie mismatch too (NaN != NaN), naming an untied tensor
    ("model.safetensors", "nan llm", ValueError, "NaN or inf values [model.norm.weight]"),
    (HEAD_CONFIG, "P 8", ValueError, f"{HEAD_CONFIG}: model.parallel_num"),
    # once blamed on the projector's weights, whose shapes follow ch_target
    (HEAD_CONFIG, "ch_target", ValueError, "(ae_config.json), the head (vision_head_config.json)"),
    # an LLM file is placed as it is: a cloned folder's link put (hard-linked) the key there
    ("notes.txt", "link out", ValueError, "notes.txt is a symlink to ../secret, outside the folder"),
])
def test_a_bad_release_fails_naming_the_problem_and_writes_nothing(release, tmp_path, name, content,
                                                                    error, named):
    if content == "wide":
        content = _head_config(release, ch_latent=256)
    elif content == "cond":
        content = _head_config(release, ch_cond=QWEN3["hidden_size"] * 2)
    elif content == "unknown":
        content = _head_config(release, colour="red")
    elif content == "extra key":
        content = {**load_file(release / PROJECTOR_WEIGHTS), "fc3.weight": torch.zeros(2, 2)}
    elif content == "int8":  # an LLM dtype no model can be built in
        content = {**json.loads((release / "config.json").read_text()), "dtype": "int8",
                   "torch_dtype": "int8"}
    elif content == "nan":
        head = load_file(release / HEAD_WEIGHTS)
        content = {**head, "net.input_proj.bias": head["net.input_proj.bias"] * float("nan")}
    elif content == "plain tokenizer":  # the query tokens dropped: a tokenizer of another model
        content = _without_query_tokens
    elif content == "float64 overflow":
        head = load_file(release / HEAD_WEIGHTS)
        content = {**head, "net.input_proj.bias": head["net.input_proj.bias"].double() * 1e300}
    elif content == "pickled LLM":  # never read: the import must not pass it on either
        content = _llm_as_pickle
    elif content == "tied but different":
        content = {**json.loads((release / "config.json").read_text()), "tie_word_embeddings": True}
    elif content == "no dtype":
        content = {**json.loads((release / "config.json").read_text()), "dtype": "float17"}
    elif content == "nan llm":
        llm = load_file(release / "model.safetensors")
        content = {**llm, "model.norm.weight": llm["model.norm.weight"] * float("nan")}
    elif content == "P 8":
        content = _head_config(release, parallel_num=8)
    elif content == "ch_target":
        content = _head_config(release, ch_target=_head_config(release)["ch_target"] * 2)
    elif content == "link out":
        content = _llm_file_linking_out
    src, out = _broken_copy(release, tmp_path, name, content), tmp_path / "export"
    with pytest.raises(error, match=re.escape(named)) as raised:
        import_release(src, str(out))
    assert "ties them" not in str(raised.value) or "ties them" in named
    assert not out.exists() and not (tmp_path / "export.tmp").exists()


def test_a_release_whose_llm_dtype_is_auto_imports_and_loads(release, tmp_path):
    """"auto" is legal in a hub config.json; it crashed the import with an AttributeError."""
    config = {**json.loads((release / "config.json").read_text()), "dtype": "auto",
              "torch_dtype": "auto"}
    src, out = _broken_copy(release, tmp_path, "config.json", config), tmp_path / "export"
    before = (tmp_path / "bad_release" / "config.json").read_bytes()
    assert import_release(src, str(out)).backbone.dtype == "float32"
    assert BitDanceModel.from_pretrained(str(out)).llm.dtype == torch.float32
    # The export's config.json says float32; the release's (hard-linked into it) stays as it was.
    assert (tmp_path / "bad_release" / "config.json").read_bytes() == before


def test_an_export_with_corrupt_weights_names_the_file(exported, tmp_path):
    from bdt.model.ar import WEIGHTS_NAME, BitDanceModel

    broken = tmp_path / "export"
    shutil.copytree(exported, broken)
    data = (broken / WEIGHTS_NAME).read_bytes()
    (broken / WEIGHTS_NAME).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{broken / WEIGHTS_NAME}: not a readable "
                                                   "safetensors file")):
        BitDanceModel.from_pretrained(str(broken))


@pytest.mark.slow
def test_import_from_and_to_s3_gives_the_same_export(release, exported, s3_bucket, tmp_path):
    from bdt import storage

    fs, root = storage.filesystem(s3_bucket)
    fs.put(str(release) + "/", f"{root}/release/", recursive=True)
    out = tmp_path / "from_s3"
    import_release(f"{s3_bucket}/release", str(out))
    for name in ("bitdance_extra.safetensors", "model_config.yaml", "llm/model.safetensors",
                 "llm/tokenizer.json", "image_tokenizer/model.safetensors"):
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name
    # Sharded components on S3: the index's shards are found beside it in the bucket.
    port = write_diffusers_port(release, tmp_path / "port", shard_bytes=20_000)
    fs.put(str(port) + "/", f"{root}/port/", recursive=True)
    import_release(f"{s3_bucket}/port", str(tmp_path / "port_from_s3"))
    for name in _files(exported):
        assert (tmp_path / "port_from_s3" / name).read_bytes() == (exported / name).read_bytes()
    # And into S3: the export is staged locally and uploaded whole.
    import_release(f"{s3_bucket}/release", f"{s3_bucket}/export")
    for name in _files(exported):
        assert fs.cat(f"{root}/export/{name}") == (exported / name).read_bytes(), name


@pytest.mark.parametrize("variant", ["16x", "64x"])
def test_bitdance_14b_release_geometry_imports(variant, tmp_path):
    """The released 14B folders' configs and weight layout (mllm_keys_14b.json: the MLLModel's
    keys and shapes, the DiffHead arguments, the Qwen3-14B config), on the meta device: the
    derived config and every projector / head tensor fit one model."""
    from reference import REF as REF_DIR

    from bdt.generation.bitdance_release import (_meta_model, extra_from_release,
                                                 release_model_config)

    ref = json.loads((REF_DIR / "mllm_keys_14b.json").read_text())
    P = int(variant.rstrip("x"))
    (vocab,) = ref["resize_token_embeddings_called_with"][variant]
    # config.json as transformers writes it (the release's is from 4.57: "dtype", layer types).
    qwen3 = {**ref["qwen3_14b_config_used"], "vocab_size": vocab, "model_type": "qwen3",
             "architectures": ["Qwen3ForCausalLM"], "rope_scaling": None,
             "layer_types": ["full_attention"] * ref["qwen3_14b_config_used"]["num_hidden_layers"],
             "transformers_version": "4.57.3", "use_cache": True}
    qwen3["dtype"] = qwen3.pop("torch_dtype")
    (tmp_path / HEAD_CONFIG).write_text(json.dumps(
        {**ref["head_constructor_args_16x"], "parallel_num": P, "grad_checkpointing": False,
         "_class_name": "DiffHead"}))
    cfg = release_model_config(str(tmp_path), qwen3, downsample=16)
    assert (cfg.parallel_num, cfg.head.width, cfg.head.depth, cfg.head.bits) == (P, 5120, 6, 32)
    assert cfg.pos_max_len == 256 and cfg.backbone.dtype == "bfloat16"

    def component(prefix):
        return {k[len(prefix):]: torch.empty(shape, device="meta")
                for k, shape in ref["state_dict_16x"].items() if k.startswith(prefix)}

    extra = extra_from_release(component("embed_vision_mlp."), component("vision_diffusion_head."),
                               cfg.head.mlp, "14B")
    model = _meta_model(cfg, qwen3, "config.json")
    model.load_extra(extra, "14B")  # raises on any missing, unexpected or mis-shaped key
    assert len(extra) == len([k for k in model.state_dict() if not k.startswith("llm.")])
    assert model.llm.get_input_embeddings().weight.shape[0] == vocab


def test_import_from_a_hugging_face_cache_snapshot(release, exported, tmp_path):
    """A snapshot in the HF cache is a folder of symlinks into ../../blobs: the export must hold
    the files themselves."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in release.iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.join("..", "..", "blobs", path.name))
    out = tmp_path / "export"
    import_release(str(snapshot), str(out))
    for name in ("llm/model.safetensors", "llm/tokenizer.json", "bitdance_extra.safetensors"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name


def test_loading_an_export_reads_its_text_tokenizer_once(exported, monkeypatch):
    """The P check read the text tokenizer, then the backbone read it again (a Qwen3 tokenizer
    takes ~1 s): it is read once and serves both."""
    from transformers import AutoTokenizer, TokenizersBackend

    reads = []
    for cls in (AutoTokenizer, TokenizersBackend):
        read = cls.from_pretrained.__func__

        def counted(klass, path, *args, _read=read, **kwargs):
            reads.append(str(path))
            return _read(klass, path, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    trained = load_trained(str(exported))
    assert reads == [str(exported / "llm")]
    assert trained.model.tokenizer.convert_tokens_to_ids("<|query_1|>") == \
        trained.model.special.query_ids[0]


def test_a_diffusers_port_imports_to_the_same_export(release, exported, tmp_path):
    """The port's folders (text_encoder/ + tokenizer/, autoencoder/, diffusion_head/, projector/)
    hold the release's tensors under its keys: the same export, file for file."""
    port = write_diffusers_port(release, tmp_path / "port")
    with pytest.raises(OSError, match="is a diffusers port .* import-bitdance"):
        load_trained(str(port))
    out = tmp_path / "export"
    import_release(str(port), str(out))
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name
    os.remove(port / "projector" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a diffusers port .* missing projector/"):
        import_release(str(port), str(tmp_path / "export2"))


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_sharded_diffusers_port_imports_to_the_same_export(release, exported, tmp_path):
    """Each component's weights as huggingface_hub shards them (an index + several files): the
    same export, file for file; a missing shard fails naming it, before anything is written."""
    port = write_diffusers_port(release, tmp_path / "port", shard_bytes=20_000)
    for component in ("autoencoder", "diffusion_head", "projector"):
        assert len(list((port / component).glob("diffusion_pytorch_model-*.safetensors"))) > 1
    out = tmp_path / "export"
    import_release(str(port), str(out))
    assert _files(out) == _files(exported)
    for name in _files(exported):
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name
    shard = sorted((port / "diffusion_head").glob("diffusion_pytorch_model-*"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing [{shard.name}]")):
        import_release(str(port), str(tmp_path / "export2"))
    assert not (tmp_path / "export2").exists()


def test_a_sharded_release_imports_without_its_shards_in_the_llm(exported, tmp_path):
    """Sharded at the release's root, BitDance's components' shards are not the LLM's files:
    the export's llm/ holds the LLM's own shards only, and the model is the release's."""
    release = write_release(tmp_path / "release", shard_bytes=20_000)
    out = tmp_path / "export"
    import_release(str(release), str(out))
    llm_files = {p.name for p in (out / "llm").iterdir()}
    assert "model.safetensors.index.json" in llm_files
    assert not {n for n in llm_files if n.startswith(("ae", "vision_head", "projector"))}
    for name in _files(exported):
        if not name.startswith("llm/"):
            assert (out / name).read_bytes() == (exported / name).read_bytes(), name
    ours, theirs = load_trained(str(out)).model.state_dict(), load_trained(str(exported)).model
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_an_export_with_sharded_weights_loads_the_same(exported, tmp_path):
    """An export whose connector + head file and image tokenizer were sharded (a tokenizer folder
    given to training is copied into the export as it is) loads the same model."""
    from mllm_tiny import save_weights

    from bdt.model.ar import WEIGHTS_NAME

    sharded = tmp_path / "export"
    shutil.copytree(exported, sharded)
    for name in (WEIGHTS_NAME, "image_tokenizer/model.safetensors"):
        tensors = load_file(sharded / name)
        (sharded / name).unlink()
        save_weights(tensors, sharded / name, shard_bytes=20_000)
    ours, theirs = load_trained(str(sharded)), load_trained(str(exported))
    for a, b in ((ours.model, theirs.model), (ours.decoder, theirs.decoder)):
        for key, value in b.state_dict().items():
            assert torch.equal(a.state_dict()[key], value), key


def test_import_into_an_empty_directory_but_never_over_a_full_one(release, exported, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    import_release(str(release), str(out))
    assert _files(out) == _files(exported)
    with pytest.raises(FileExistsError, match="export exists and is not empty"):
        import_release(str(release), str(out))
    assert not (tmp_path / "export.tmp").exists()
