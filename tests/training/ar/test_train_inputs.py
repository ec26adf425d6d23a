"""bdt/train.py front door: the real `deepspeed` launcher, and bad input failing at start with
one clear line (missing shards, another image tokenizer's shards, wrong bits, another model's
checkpoints)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bdt.config import load
from bdt.training.distributed import DistInfo, free_port
from bdt.training.ar.start_checks import check_data
from bdt.training.model_shapes import (check_model_signature, model_signature,
                                       record_model_signature)
from bdt.training.ar.config import TrainConfig
from testkit import REPO, TINY_CONFIG
from trainutil import tiny_image_tokenizer, tiny_llm, train_overrides, write_shards

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def config(tmp_path, shards, *extra):
    return OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), "unused", shards, extra=extra)))


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    """The real launcher, with the in-loop sample grid and the export (image tokenizer inside)."""
    llm = tiny_llm(str(tmp_path / "llm"))
    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2, per_shard=6)
    run_dir = tmp_path / "run"
    extra = [f"data.tokenizer={tok}", "logging.sample_every=3", "logging.sample_hw=[4,4]",
             "logging.sample_steps=2"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), os.path.join(REPO, "bdt", "train.py"),
           "--config", TINY_CONFIG, *train_overrides(str(run_dir), llm, str(tmp_path / "s"), steps=3,
                                                 every=0, extra=extra)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3 and len(summary["param_digests"]) == 2
    assert len(set(summary["param_digests"])) == 1
    assert (run_dir / "checkpoints" / "step_000000003" / "COMPLETE").exists()
    assert Image.open(run_dir / "samples" / "step_000000003.png").size == (2 * 4 * 2, 4 * 2)
    export = run_dir / "export"
    assert (export / "image_tokenizer" / "model.safetensors").read_bytes() == \
        (tmp_path / "tok" / "model.safetensors").read_bytes()
    assert (export / "llm" / "tokenizer.json").exists() and (export / "train_config.yaml").exists()


@pytest.mark.slow
def test_plain_python_single_process_zero0_with_deepspeeds_muon(tmp_path):
    """`python bdt/train.py` with no launcher: a world of one, ZeRO-0, fp32 (grad norm read by us),
    MFU against the matmul peak the run measures (the other tests give one), and DeepSpeed's Muon
    chosen in the config (`deepspeed.extra.optimizer.type`): the trainer's stand-in for DeepSpeed's
    Muon module, which spares other runs its import, failed it at start ("MuonWithAuxAdam() takes
    no arguments"). Compiling Muon's kernels is left out (TORCHDYNAMO_DISABLE)."""
    llm = tiny_llm(str(tmp_path / "llm"))
    write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=1, per_shard=8)
    run_dir = tmp_path / "run"
    muon = "deepspeed.extra={optimizer: {type: Muon, params: {muon_lr: 5.0, momentum: 0.95}}}"
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(run_dir), llm, str(tmp_path / "s"), steps=2, zero=0, every=0,
                            extra=["export=false", "logging.peak_tflops=0", muon])]
    proc = subprocess.run(cmd, env=dict(ENV, TORCHDYNAMO_DISABLE="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2 and len(summary["param_digests"]) == 1
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    assert len(norms) == 2 and all(0 < n < float("inf") for n in norms)
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert len(mfus) == 2 and all(0 < m < 1 for m in mfus), mfus
    # The logged LR is the matrices' (Muon's) half: muon_lr x the stage LR (the trainer's base LR
    # is 1); warmup_steps 2 starts at half the stage's 3e-3.
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[0] == pytest.approx(5.0 * 3e-3 / 2), lrs


@pytest.mark.slow
def test_missing_shards_fail_at_start_with_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(tmp_path / "run"), "unused", str(tmp_path / "nowhere"))]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stages[0] (s0): shards:") and "nowhere" in last
    assert "does not exist" in last


def _manifest(root, sha):
    """An extraction output: one family 's' of real shards + index.json naming the tokenizer."""
    write_shards(str(root / "s"), [(4, 4)], num_shards=1, per_shard=2)
    index = {"schema": 1, "tokenizer": {"path": "tok", "sha256": sha},
             "stages": {"s": {"shards": [{"shard": "s/000000.tar"}]}}}
    (root / "index.json").write_text(json.dumps(index))
    return str(root)


def test_shards_of_another_image_tokenizer_are_refused(tmp_path):
    from bdt.tokenizer.io import tokenizer_identity

    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    good = tokenizer_identity(tok)["sha256"]
    ok = _manifest(tmp_path / "a", good)
    other = _manifest(tmp_path / "b", {"config.json": "0" * 64})
    assert check_data(config(tmp_path, ok, f"data.tokenizer={tok}")).sources[0].urls
    with pytest.raises(ValueError, match=r"stages\[0\] \(s0\).*different image tokenizer"):
        check_data(config(tmp_path, other, f"data.tokenizer={tok}"))
    # without data.tokenizer, two stages must still agree with each other
    with pytest.raises(ValueError, match=r"stages\[1\] \(s1\).*different image tokenizer"):
        check_data(config(tmp_path, [ok, other]))


def _broken_tokenizer(path: str) -> str:
    """A tokenizer folder whose config.json does not fit its weights (twice the channels)."""
    tiny_image_tokenizer(path)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "ch": config["ch"] * 2}, f)
    return path


def test_an_image_tokenizer_that_does_not_load_or_has_other_bits_is_refused(tmp_path):
    """The export copies data.tokenizer: unchecked (no manifest recording a tokenizer), a broken
    one replaced the export's image tokenizer with exit 0, and `bdt sample` failed on it."""
    from bdt.training.ar.start_checks import check_image_tokenizer

    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    check_image_tokenizer(config(tmp_path, "s", f"data.tokenizer={tok}"))
    check_image_tokenizer(config(tmp_path, "s"))  # none: nothing to check
    broken = _broken_tokenizer(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match=rf"^data.tokenizer = {broken} does not load: .*shape"):
        check_image_tokenizer(config(tmp_path, "s", f"data.tokenizer={broken}"))
    with pytest.raises(ValueError, match=rf"^data.tokenizer = {tmp_path}/nowhere does not load"):
        check_image_tokenizer(config(tmp_path, "s", f"data.tokenizer={tmp_path}/nowhere"))
    wide = tiny_image_tokenizer(str(tmp_path / "wide"), bits=32)
    with pytest.raises(ValueError, match=rf"^data.tokenizer = {wide} writes 32-bit tokens, "
                                         r"model.head.bits is 16"):
        check_image_tokenizer(config(tmp_path, "s", f"data.tokenizer={wide}"))


@pytest.mark.slow
def test_an_image_tokenizer_that_does_not_load_fails_the_trainer_at_start(tmp_path):
    write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2)
    broken = _broken_tokenizer(str(tmp_path / "broken"))
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(tmp_path / "run"), "unused", str(tmp_path / "s"),
                            extra=[f"data.tokenizer={broken}"])]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: data.tokenizer = {broken} does not load")
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("key", ["data.tokenizer", "model.backbone.path"])
def test_a_folder_the_export_copies_linking_out_is_refused_at_start(tmp_path, key):
    """The export copies data.tokenizer, and the LLM's text tokenizer saves its files again
    (a chat_template.jinja's text too): a cloned folder linking to ~/.ssh/id_rsa put the key
    there. Refused before the shards are read, not at the export after hours of training."""
    from bdt.training.ar import loop

    (tmp_path / "secret").write_text("PRIVATE KEY")
    folder = tmp_path / "cloned"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "chat_template.jinja").symlink_to(tmp_path / "secret")
    (tmp_path / "store.safetensors").write_bytes(b"")
    # The LLM's weights are loaded as tensors and saved from them: a link to a store is fine.
    (folder / "model.safetensors").symlink_to(tmp_path / "store.safetensors")
    cfg = config(tmp_path, str(tmp_path / "nowhere"), f"{key}={folder}")
    with pytest.raises(ValueError, match=rf"^{key} = {folder}: chat_template.jinja is a symlink "
                                         rf"to {tmp_path}/secret, outside the folder"):
        loop.run(cfg, lambda cfg, dist: [])
    assert not (tmp_path / "run").exists()
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ValueError) as e:
        loop.run(cfg, lambda cfg, dist: [])
    assert ("model.safetensors is a symlink" in str(e.value)) == (key == "data.tokenizer")


def test_bits_per_token_mismatch_is_refused(tmp_path):
    write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2, bits=32)
    with pytest.raises(ValueError, match="32-bit tokens, model.head.bits is 16"):
        check_data(config(tmp_path, str(tmp_path / "s")))


def test_checkpoints_of_another_model_shape_are_refused(tmp_path):
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    root = str(tmp_path / "ck")
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    check_model_signature(root, model_signature(small), dist)  # nothing recorded yet
    record_model_signature(root, model_signature(small), dist)  # the first start, once resumed
    check_model_signature(root, model_signature(small), dist)  # same shape: fine
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"different model: parameter '0.weight' is \[8, 4\] "
                                         r"there and \[16, 4\]"):
        check_model_signature(root, model_signature(wide), dist)
    # config values that shape no parameter (the tokenizer's norm_groups) count where recorded
    other = str(tmp_path / "other")
    record_model_signature(other, model_signature(small, {"norm_groups": 32}), dist)
    with pytest.raises(ValueError, match=r"different model: model.norm_groups is 32 there and 1"):
        check_model_signature(other, model_signature(small, {"norm_groups": 1}), dist)
    check_model_signature(root, model_signature(small, {"norm_groups": 1}), dist)  # none recorded


def test_a_damaged_shape_record_is_written_again_once_resumed(tmp_path, caplog):
    """model_shapes.json cut short (a damaged disk): a warning naming it and a new record, not
    a JSON error that would keep the run from ever resuming. The new record waits for the
    resume: written at the check, it took the shapes of whatever config that start had, and a
    config the checkpoints do not fit then made the original one refused ever after."""
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    root = tmp_path / "ck"
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    record_model_signature(str(root), model_signature(small), dist)
    record = root / "model_shapes.json"
    record.write_text(record.read_text()[:10])
    check_model_signature(str(root), model_signature(wide), dist)  # its resume then fails
    assert f"{record} is damaged" in caplog.text
    check_model_signature(str(root), model_signature(small), dist)  # the original config
    record_model_signature(str(root), model_signature(small), dist)
    assert json.loads(record.read_text()) == model_signature(small)
    record_model_signature(str(root), model_signature(wide), dist)  # a record stays as it is
    assert json.loads(record.read_text()) == model_signature(small)


@pytest.mark.parametrize("override, named", [
    ("stages.0.lr=-1e-3", r"stages\[0\] \(s0\).lr must be >= 0, got -0.001"),
    ("stages.0.lr=.nan", r"stages\[0\] \(s0\).lr must be >= 0, got nan"),
    ("stages.0.min_lr_ratio=5", r"min_lr_ratio must be in \[0, 1\], got 5.0"),
    ("stages.0.schedule=linear", r"stages\[0\] \(s0\).schedule must be one of"),
    ("stages.0.warmup_steps=-1", r"warmup_steps must be >= 0, got -1"),
    ("stages.0.shards=''", r"stages\[0\] \(s0\).shards is empty: set data.root"),
    ("optim.beta1=1.5", r"optim.beta1 must be in \[0, 1\), got 1.5"),
    ("optim.grad_clip=-1", r"optim.grad_clip must be >= 0 \(0 = off\), got -1.0"),
    ("optim.eps=0", r"optim.eps must be > 0, got 0.0"),
    # accepted and ignored before: each stage has its own schedule
    ("optim.lr=3e-4", r"optim.lr: the AR trainer takes its LR schedule from each stage; set "
                      r"stages.N.lr instead \(got optim.lr=0.0003\)"),
    ("optim.schedule=constant", r"optim.schedule: .* set stages.N.schedule instead"),
    ("eval.every=-1", r"eval.every must be >= 0 \(0 = off\)"),
    ("seed=100000000000000000000", r"key 'seed': 100000000000000000000 does not fit in 64 bits"),
    ("seed=-1", r"seed must be in \[0, 2\^63\)"),
    ("threads=-1", r"threads must be >= 0"),
    ("logging.sample_steps=0", r"logging.sample_steps must be >= 1"),
    ("stages.0.tokens=-5", r"stages\[0\] \(s0\): set exactly one of steps and tokens \(got "
                           r"steps=6, tokens=-5\)"),
    ("model.parallel_num=-4", r"model.parallel_num: parallel_num \(P\) must be a perfect square "
                              r">= 1, got -4"),
    ("stages.0.parallel_num=-1", r"stages\[0\] \(s0\).parallel_num: parallel_num \(P\) must be a "
                                 r"perfect square >= 1 \(0 = model.parallel_num\), got -1"),
    ("model.head.p_std=.nan", r"model.head.p_std, time_shift and mlp_ratio must be finite and > 0"),
    ("model.head.time_shift=.inf", r"time_shift and mlp_ratio must be finite and > 0, got 0.8, inf"),
    ("model.head.p_mean=.nan", r"model.head.p_mean must be a finite number, got nan"),
    # huge sizes failed as allocator errors naming no key, once the LLM had loaded
    ("model.head.width=1000000000", r"model.head.width must be in \[1, 32768\], got 1000000000"),
    ("model.head.depth=0", r"model.head.depth must be in \[1, 256\], got 0"),
    ("model.pos_max_len=1000000000", r"model.pos_max_len must be in \[1, 16384\], got 1000000000"),
    ("model.backbone.dtype=int8", r"model.backbone.dtype: backbone dtype 'int8' is not a torch "
                                  r"floating dtype"),
    ("checkpoint.keep_last=-1", r"checkpoint.keep_last must be >= 0 \(0 = keep all\), got -1"),
    ("checkpoint.staging_dir=s3://b/stage", r"checkpoint.staging_dir must be a local directory, "
                                            r"got 's3://b/stage'"),
    ("run_dir=s3://b/run", r"run_dir must be a local directory, got 's3://b/run'"),
    # the OS took them for folders named '~' and 'file:', storage for $HOME/run and /ck: a run
    # wrote its lock to one and read its RUN_ID from the other
    ("run_dir=~/run", r"run_dir '~/run': give the path itself \(/.*/run\); the trainers do "
                      r"not expand '~' or read file: or local: URLs"),
    ("checkpoint.dir=file:///ck", r"checkpoint.dir 'file:///ck': give the path itself \(/ck\)"),
    ("checkpoint.staging_dir=~/st", r"checkpoint.staging_dir '~/st': give the path itself"),
    ("checkpoint.dir=local:///ck", r"checkpoint.dir 'local:///ck': give the path itself \(/ck\)"),
    # a YAML's `$USER` is no shell's: the run wrote into a folder named '$USER'
    ("run_dir=/scratch/$USER/run", r"run_dir '/scratch/\$USER/run': \$USER is not expanded in a "
                                   r"config; write \$\{oc.env:USER\} \(or the path itself\)"),
    ("checkpoint.dir=s3://b/$RUN/ck", r"checkpoint.dir 's3://b/\$RUN/ck': \$RUN is not expanded"),
    # one slash short: storage read /run, the OS a folder 'local:' (check_not_short_url lets
    # local: and file: through)
    ("run_dir=local:/run", r"run_dir 'local:/run': give the path itself \(/run\)"),
    ("model.backbone.path=s3://b/llm", r"model.backbone.path 's3://b/llm' \(init_from's llm/ when "
                                       r"set\) must be a local directory or a hub id"),
    ("data.buffer_size=0", r"data.buffer_size must be in \[1, 1048576\] samples, got 0"),
    # the endless stream read on until the rank ran out of memory
    ("data.buffer_size=1000000000000", r"data.buffer_size must be in \[1, 1048576\] samples"),
    ("data.prefetch=1000000000", r"data.prefetch must be in \[0, 256\] rows \(0 = off\), got "
                                 r"1000000000"),
    ("data.prefetch=-1", r"data.prefetch must be in \[0, 256\] rows"),
    ("data.prefetch_worker=fork", r"data.prefetch_worker must be one of auto, thread, process"),
    ("data.stall_s=-1", r"data.stall_s must be a finite number of seconds >= 0 \(0 = no limit\)"),
    ("data.stall_s=.inf", r"data.stall_s must be a finite number of seconds >= 0"),
    # the wait for a row overflowed: an OverflowError at the first step (prefetch 0 too)
    ("data.stall_s=1e10", r"data.stall_s must be .* and at most 1e6, got 10000000000.0"),
    ("deepspeed.grad_accum=0", r"deepspeed: micro_batch_size and grad_accum must be >= 1"),
    ("deepspeed.zero_stage=5", r"deepspeed.zero_stage: expected 0, 1, 2 or 3, got 5"),
    ("deepspeed.precision=fp16", r"deepspeed.precision: expected one of \('fp32', 'bf16'\)"),
    ("fault.sigterm_at_step=-1", r"fault.sigterm_at_step must be >= 0 \(0 = off\), got -1"),
    ("logging.peak_tflops=-5", r"logging.peak_tflops must be a finite number >= 0"),
    ("logging.peak_tflops=.nan", r"logging.peak_tflops must be a finite number >= 0"),
])
def test_values_no_run_can_use_are_named_at_start(tmp_path, override, named):
    """Values that would fail deep inside torch or the sampler, or train silently wrong."""
    from bdt.training.ar.config import validate

    with pytest.raises(ValueError, match=named):
        validate(config(tmp_path, str(tmp_path / "s"), override))

def test_a_run_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=f"run_dir '{tmp_path / 'afile'}' is a file"):
        _validate(tmp_path, f"run_dir={tmp_path / 'afile'}")


def _validate(tmp_path, *extra):
    from bdt.training.ar.config import validate

    validate(config(tmp_path, str(tmp_path / "s"), *extra))


def test_compile_is_refused_with_zero3_and_unknown_backends(tmp_path):
    _validate(tmp_path, "compile.enabled=true", "compile.backend=aot_eager")
    with pytest.raises(ValueError, match=r"compile.enabled needs deepspeed.zero_stage 0-2"):
        _validate(tmp_path, "compile.enabled=true", "deepspeed.zero_stage=3")
    with pytest.raises(ValueError, match=r"compile.backend: unknown torch.compile backend 'nope'"):
        _validate(tmp_path, "compile.enabled=true", "compile.backend=nope")


def test_ar_preview_grid_beyond_the_position_table_is_named(tmp_path):
    on = ["logging.sample_every=5", "data.tokenizer=tok"]
    _validate(tmp_path, *on, "logging.sample_hw=[64,64]")  # tiny.yaml: pos_max_len 64
    with pytest.raises(ValueError, match=r"logging.sample_hw \[66, 66\] exceeds the 2D position "
                                         r"table: model.pos_max_len = 64"):
        _validate(tmp_path, *on, "logging.sample_hw=[66,66]")


def test_ar_legal_edge_values_pass(tmp_path, caplog):
    """0 means 'only at the end' / 'keep all' / 'off'; lr 0 and a warmup as long as the stage
    are legal (a warning says the LR never peaks); micro_batch_size is unused by this trainer."""
    _validate(tmp_path, "checkpoint.every=0", "checkpoint.keep_last=0", "stages.0.lr=0",
        "deepspeed.micro_batch_size=0", "stages.0.warmup_steps=6")
    assert "warmup_steps 6 >= steps 6: the LR ramps up for the whole stage" in caplog.text


def test_ar_token_budget_below_one_sample_and_grids_beyond_the_table_fail_at_start(tmp_path):
    """Found before the model: every sample longer than the budget was skipped until a whole
    epoch had been read, and a grid beyond the position table failed at its first step."""
    write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=1, per_shard=2)

    def data(*extra):
        return check_data(config(tmp_path, str(tmp_path / "s"), *extra)).sources

    assert data("stages.0.token_budget=16")  # the 4x4 samples fit
    with pytest.raises(ValueError, match=r"stages\[0\] \(s0\).token_budget = 15 is smaller than "
                                         r"one sample: the image tokens of its smallest grid "
                                         r"\(4x4\) alone are 16"):
        data("stages.0.token_budget=15")
    with pytest.raises(ValueError, match=r"holds 4x4 token grids, beyond the 2D position table "
                                         r"\(model.pos_max_len = 2 tokens per side\)"):
        data("model.pos_max_len=2")


def test_in_loop_eval_values_are_checked_when_it_is_on(tmp_path):
    from bdt.training.ar.config import validate

    on = ["eval.every=5", "data.tokenizer=tok"]
    validate(config(tmp_path, "s", "eval.batch=0"))  # off: not used, not checked
    for override, named in (("eval.batch=0", "eval.batch must be >= 1"),
                            ("eval.cfg_scale=.nan", "eval.cfg_scale must be a finite number")):
        with pytest.raises(ValueError, match=named):
            validate(config(tmp_path, "s", *on, override))


def test_stage_p_and_eval_keys_are_checked_at_start(tmp_path):
    from bdt.training.ar.config import validate

    write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2)
    s = str(tmp_path / "s")

    def stages(*ps):
        return "stages=[" + ",".join(f"{{name: p{i}, shards: '{s}', steps: 1, parallel_num: {p}}}"
                                     for i, p in enumerate(ps)) + "]"

    validate(config(tmp_path, s, stages(1, 4)))  # a smaller P first, the model's (4) last
    with pytest.raises(ValueError, match=r"stages\[0\] \(p0\).parallel_num = 16 exceeds "
                                         r"model.parallel_num = 4"):
        validate(config(tmp_path, s, stages(16, 4)))
    with pytest.raises(ValueError, match=r"stages\[1\] \(p1\).parallel_num = 1: the last stage "
                                         r"must train model.parallel_num = 4"):
        validate(config(tmp_path, s, stages(4, 1)))
    with pytest.raises(ValueError, match=r"stages\[0\] \(p0\).parallel_num: .*perfect square"):
        validate(config(tmp_path, s, stages(2, 4)))
    write_shards(str(tmp_path / "odd"), [(2, 6)], num_shards=1, per_shard=2)
    with pytest.raises(ValueError, match=r"2x6 token grids, not divisible into the 4x4 patches "
                                         r"of P = 16"):
        check_data(config(tmp_path, str(tmp_path / "odd"), "model.parallel_num=16"))
    with pytest.raises(ValueError, match="eval.every needs data.tokenizer"):
        validate(config(tmp_path, s, "eval.every=5"))
    with pytest.raises(ValueError, match=r"eval.categories: unknown \['colour'\]"):
        validate(config(tmp_path, s, "eval.every=5", "data.tokenizer=tok", "eval.categories=[colour]"))
    # Every grid is checked at start: a manifest's later bucket (96x32 px = 2x6 tokens), the
    # preview size and the in-loop evaluation size, not only the first sample's grid.
    man = tmp_path / "man"
    write_shards(str(man / "s"), [(4, 4)], num_shards=1, per_shard=2)
    (man / "index.json").write_text(json.dumps({"schema": 1, "stages": {"s": {
        "buckets": [[64, 64], [96, 32]], "shards": [{"shard": "s/000000.tar"}]}}}))
    with pytest.raises(ValueError, match=r"holds 2x6 token grids, not divisible into the 4x4 "
                                         r"patches of P = 16"):
        check_data(config(tmp_path, str(man), "model.parallel_num=16"))
    with pytest.raises(ValueError, match=r"logging.sample_hw 4x6 is not divisible by the patch "
                                         r"side 4 \(P = 16\)"):
        validate(config(tmp_path, s, "model.parallel_num=16", "data.tokenizer=tok",
                        "logging.sample_every=5", "logging.sample_hw=[4,6]"))
    with pytest.raises(ValueError, match=r"eval.width = 96 px is not a multiple of 64"):
        check_data(config(tmp_path, s, "model.parallel_num=16", "eval.every=5", "eval.width=96"))


def test_time_limit_fit_needs_a_limit_and_a_fraction(tmp_path):
    from bdt.training.ar.config import validate

    write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2)
    s = str(tmp_path / "s")
    validate(config(tmp_path, s, "time_limit_min=5", "time_limit_fit=0.9"))
    for bad in (["time_limit_fit=0.9"], ["time_limit_min=5", "time_limit_fit=1.5"],
                ["time_limit_min=5", "time_limit_fit=-0.1"]):
        with pytest.raises(ValueError, match="time_limit_fit must be in"):
            validate(config(tmp_path, s, *bad))


def test_a_budget_below_one_samples_prompt_and_prefix_is_refused_before_training(tmp_path):
    """The start check counted image tokens only: a budget of h*w passed, every sample was then
    skipped as oversize, and the stage failed after a whole epoch of reading."""
    from bdt.data.shard_source import ShardList
    from bdt.model.ar import BitDanceModel
    from bdt.training.ar.start_checks import check_budgets

    llm = tiny_llm(str(tmp_path / "llm"))
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), llm, "unused", extra=["model.head.bits=16"])))
    model = BitDanceModel.from_config(cfg.model)
    shards = ShardList(urls=[], manifest=None, source="s", grids=[(4, 4), (8, 8)])
    check_budgets(cfg, model, [shards])  # 160 tokens: fits
    cfg.stages[0].token_budget = 16  # the 4x4 image alone fits, with its prompt it does not
    with pytest.raises(ValueError, match=r"stages\[0\] \(s0\).token_budget = 16 is smaller than "
                                         r"one sample: its smallest \(4x4 tokens, no caption\)"):
        check_budgets(cfg, model, [shards])


def test_a_grid_the_stage_cannot_pack_is_refused_before_training(tmp_path):
    """Only the smallest grid was checked: a larger bucket that no sample of fits the budget, or
    with a side beyond the model's <|res_k|> tokens (256 here, inside model.pos_max_len), passed
    the start, and training then skipped every sample of it (as oversize or bad_grid)."""
    from bdt.data.shard_source import ShardList
    from bdt.model.ar import BitDanceModel
    from bdt.training.ar.start_checks import check_budgets

    llm = tiny_llm(str(tmp_path / "llm"))
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), llm, "unused", extra=["model.head.bits=16"])))
    model = BitDanceModel.from_config(cfg.model)
    cfg.stages[0].token_budget = 2000
    check_budgets(cfg, model, [ShardList(urls=[], manifest=None, source="s",
                                         grids=[(4, 4), (4, 256)])])  # <|res_256|>: the last
    with pytest.raises(ValueError, match=r"^stages\[0\] \(s0\): unused holds 4x258 token grids: "
                                         r"no <\|res_258\|> token"):
        check_budgets(cfg, model, [ShardList(urls=[], manifest=None, source="s",
                                             grids=[(4, 4), (4, 258)])])
    cfg.stages[0].token_budget = 50  # a 4x4 sample fits, no 8x8 one (64 image tokens)
    with pytest.raises(ValueError, match=r"^stages\[0\] \(s0\).token_budget = 50 cannot hold a "
                                         r"sample of its 8x8 token grids \(\d+ tokens with no "
                                         r"caption\)"):
        check_budgets(cfg, model, [ShardList(urls=[], manifest=None, source="s",
                                             grids=[(4, 4), (8, 8)])])


def test_more_threads_than_cpus_are_refused_naming_the_key():
    """threads=100000 passed validation and crashed the rank with a segfault in torch."""
    import os

    from bdt.training.ar.start_checks import set_threads

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=f"^threads = 100000 exceeds this machine's "
                                         f"{os.cpu_count()} CPUs$"):
        set_threads(100000)
    set_threads(0)  # torch's default stays
    assert torch.get_num_threads() == before
