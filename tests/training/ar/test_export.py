"""The trainer's export replaces an earlier one in one step: a reader, or a kill, never meets
half an export (`bdt sample --model <run_dir>` takes one whose model_config.yaml is left for the
model, and fails on its missing files instead of sampling the newest checkpoint)."""

import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen3Config, Qwen3ForCausalLM

from bdt.config import load
from bdt.model.ar import CONFIG_NAME, BitDanceModel
from bdt.training.ar import export
from bdt.training.ar.config import TrainConfig
from bdt.training.distributed import DistInfo
from testkit import TINY_CONFIG

import mllm_tiny


class Killed(BaseException):
    """A SIGKILL, as far as the code under test can tell: nothing after it runs."""


def test_a_kill_while_the_old_export_is_deleted_leaves_a_whole_one(tmp_path, monkeypatch):
    llm = Qwen3ForCausalLM(Qwen3Config(**mllm_tiny.QWEN3))
    model = BitDanceModel(mllm_tiny.model_config(), llm)
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
        f"run_dir={tmp_path}", "model.backbone.path=unused", f"data.root={tmp_path}"]))
    solo = DistInfo(0, 1, 0, torch.device("cpu"))
    out = str(tmp_path / "export")
    engine = SimpleNamespace(module=model)  # what the export reads of the DeepSpeed engine
    export.export_model(engine, model, cfg, out, solo)
    first, rmtree = sorted(os.listdir(out)), shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        """Deletes one entry of a whole export, then the process dies."""
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            os.remove(os.path.join(path, CONFIG_NAME))
            raise Killed
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        export.export_model(engine, model, cfg, out, solo)
    assert sorted(os.listdir(out)) == first  # the new export, whole


@pytest.mark.parametrize("swaps", [True, False])
def test_a_kill_at_any_rename_leaves_a_whole_export(tmp_path, monkeypatch, swaps):
    """The old export left by one rename and the new one came by a second: a kill (or a reader)
    between the two found no export. Where the OS swaps two names in one step the export is
    whole at every moment; elsewhere (`swaps` False: not Linux, NFS) the two renames remain and
    a kill between them leaves the old one beside it."""
    llm = Qwen3ForCausalLM(Qwen3Config(**mllm_tiny.QWEN3))
    model = BitDanceModel(mllm_tiny.model_config(), llm)
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
        f"run_dir={tmp_path}", "model.backbone.path=unused", f"data.root={tmp_path}"]))
    solo, out = DistInfo(0, 1, 0, torch.device("cpu")), str(tmp_path / "export")
    engine = SimpleNamespace(module=model)
    export.export_model(engine, model, cfg, out, solo)
    whole, held = sorted(os.listdir(out)), open(os.path.join(out, CONFIG_NAME), "rb")
    before = held.read()
    held.seek(0)
    real_replace, real_exchange = os.replace, getattr(export, "_exchange", None)

    def replace_then_killed(src, dst):
        real_replace(src, dst)
        if out in (os.fspath(src), os.fspath(dst)):
            raise Killed

    def exchange_then_killed(a, b):
        if not swaps:
            return False
        assert real_exchange(a, b)
        raise Killed

    monkeypatch.setattr(os, "replace", replace_then_killed)
    monkeypatch.setattr(export, "_exchange", exchange_then_killed, raising=False)
    with pytest.raises(Killed):
        export.export_model(engine, model, cfg, out, solo)
    if swaps:
        assert sorted(os.listdir(out)) == whole
    else:
        assert not os.path.exists(out) and sorted(os.listdir(out + ".old")) == whole
    monkeypatch.undo()
    export.export_model(engine, model, cfg, out, solo)  # the next export cleans up
    assert sorted(os.listdir(out)) == whole and held.read() == before  # open: still readable
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_the_weights_get_the_mode_open_gives_not_safetensors_0600(tmp_path):
    """safetensors writes 0600 whatever the umask: the trainer's export (not staged_dir's) had
    weights unreadable to the cluster's group while the configs beside them were not."""
    llm = Qwen3ForCausalLM(Qwen3Config(**mllm_tiny.QWEN3))
    model = BitDanceModel(mllm_tiny.model_config(), llm)
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
        f"run_dir={tmp_path}", "model.backbone.path=unused", f"data.root={tmp_path}"]))
    out = tmp_path / "export"
    old = os.umask(0o027)
    try:
        export.export_model(SimpleNamespace(module=model), model, cfg, str(out),
                            DistInfo(0, 1, 0, torch.device("cpu")))
    finally:
        os.umask(old)
    for name in ("bitdance_extra.safetensors", "llm/model.safetensors", CONFIG_NAME):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


def test_the_export_records_the_stage_path_the_run_read(tmp_path, monkeypatch):
    """A stage's shards are one path (list_shards takes no comma list): `run,v2/tok` was recorded
    as `<cwd>/run,<cwd>/v2/tok` and the sampler's trained-bucket check, finding nothing there,
    was silently off. `~` as the run read it; a remote URL as given."""
    from bdt.config import save_resolved
    from bdt.generation.trained import trained_buckets

    root = tmp_path / "run,v2" / "tok"
    (root / "f").mkdir(parents=True)
    (root / "f" / "000000.tar").write_bytes(b"")
    (root / "index.json").write_text(json.dumps({"stages": {"f": {
        "shards": [{"shard": "f/000000.tar"}], "buckets": [[64, 48]]}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def recorded(shards: str, family: str = ""):
        return export._with_absolute_shards(OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
            "model.backbone.path=unused", f"stages.0.shards='{shards}'",
            f"stages.0.family='{family}'"])))

    assert recorded("~/s/*.tar").stages[0].shards == f"{tmp_path}/home/s/*.tar"
    assert recorded("s3://x/c,d").stages[0].shards == "s3://x/c,d"
    record = recorded("run,v2/tok/", "f")
    assert record.stages[0].shards == str(root)
    save_resolved(record, str(tmp_path / "export"), name="train.yaml")
    monkeypatch.chdir(tmp_path / "export")  # another working directory
    assert trained_buckets(str(tmp_path / "export" / "train.yaml")) == [(64, 48)]


def _export(tmp_path, tokenizer: str) -> str:
    llm = Qwen3ForCausalLM(Qwen3Config(**mllm_tiny.QWEN3))
    model = BitDanceModel(mllm_tiny.model_config(), llm)
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
        f"run_dir={tmp_path}", "model.backbone.path=unused", f"data.root={tmp_path}",
        f"data.tokenizer={tokenizer}"]))
    out = str(tmp_path / "export")
    export.export_model(SimpleNamespace(module=model), model, cfg, out,
                        DistInfo(0, 1, 0, torch.device("cpu")))
    return out


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("link, says", [
    ("{secret}", "{secret}, outside the folder"),  # absolute
    ("../secret", "../secret, outside the folder"),
    ("{home}", "{home}, outside the folder"),  # a folder: its files would come along
    ("../nowhere", "../nowhere, which leads nowhere"),
    ("notes.txt", "notes.txt, which leads nowhere"),  # a loop
])
def test_a_tokenizer_folder_linking_out_is_refused_and_the_old_export_stays(tmp_path, link, says):
    """A cloned tokenizer folder with `notes.txt -> ~/.ssh/id_rsa` put the key into the export,
    which a user may publish."""
    from trainutil import tiny_image_tokenizer

    (tmp_path / "secret").write_text("PRIVATE KEY")
    (tmp_path / "home").mkdir()
    tok = tmp_path / "tok"
    out = _export(tmp_path, tiny_image_tokenizer(str(tok)))
    before = _tree(tmp_path / "export")
    fill = dict(secret=tmp_path / "secret", home=tmp_path / "home")
    (tok / "notes.txt").symlink_to(link.format(**fill))
    with pytest.raises(ValueError, match=re.escape(f"data.tokenizer = {tok}: notes.txt is a "
                                                   f"symlink to {says.format(**fill)}")):
        _export(tmp_path, str(tok))
    assert _tree(tmp_path / "export") == before and not os.path.exists(out + ".tmp")


def test_a_hugging_face_snapshot_is_copied_as_files_but_only_from_its_blobs(tmp_path):
    """A Hugging Face cache snapshot is links into ../../blobs by design: taken, its files copied
    as files, with the tokenizer identity the manifests record; a link past blobs/ is not."""
    from bdt.tokenizer.io import tokenizer_identity
    from trainutil import tiny_image_tokenizer

    plain = tmp_path / "plain"
    tiny_image_tokenizer(str(plain))
    (plain / "README.md").write_text("a tokenizer")
    repo = tmp_path / "models--x--tok"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (snapshot / "docs").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (repo / "blobs" / name).write_bytes((plain / name).read_bytes())
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", name))
    (snapshot / "docs" / "guide.md").write_text("a tokenizer")
    (snapshot / "README.md").symlink_to(os.path.join("docs", "guide.md"))  # inside the folder
    out = _export(tmp_path, str(snapshot))
    copied = tmp_path / "export" / "image_tokenizer"
    assert _tree(copied) == {**_tree(plain), "docs/guide.md": b"a tokenizer"}
    assert not any(p.is_symlink() for p in copied.rglob("*"))
    assert tokenizer_identity(str(snapshot))["sha256"] == tokenizer_identity(str(copied))["sha256"]
    (tmp_path / "secret").write_text("PRIVATE KEY")
    (snapshot / "notes.txt").symlink_to(os.path.join("..", "..", "..", "secret"))
    with pytest.raises(ValueError, match=r"notes.txt is a symlink to \.\./\.\./\.\./secret, "
                                         r"outside the folder"):
        _export(tmp_path, str(snapshot))
    assert "notes.txt" not in os.listdir(os.path.join(out, "image_tokenizer"))
