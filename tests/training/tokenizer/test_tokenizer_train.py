"""Tokenizer training end to end on tiny shapes shards: 2-rank DeepSpeed ZeRO-2 on CPU with
checkpoint + resume (compared with an uninterrupted run), and a single plain process with export."""

import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from bdt.config import load
from bdt.data.shapes import ShapesConfig
from bdt.data.shards import generate
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.training.checkpoint import MARKER, tag_for
from bdt.training.checkpoint_owner import OWNER_NAME
from bdt.training.distributed import free_port
from bdt.training.schedule import WarmupSchedule
from bdt.training.tokenizer.config import TokenizerTrainConfig
from bdt.training.tokenizer.gan import Discriminator
from bdt.training.tokenizer.loop import main, train
from testkit import terminal_job_signals
from trainutil import rank_entry, spawn_ranks

REPO = Path(__file__).resolve().parents[3]

TINY = ["model.ch=32", "model.ch_mult=[1,1]", "model.num_res_blocks=1", "model.z_channels=8",
        "data.size=16", "data.num_workers=0", "deepspeed.micro_batch_size=2",
        "optim.lr=1e-3", "optim.warmup_steps=1", "optim.schedule=constant", "logging.every=1",
        "logging.image_every=2", "logging.tensorboard=false", "loss.disc_weight=0.1", "loss.disc_start=1",
        "loss.lecam_weight=0.05", "loss.disc_layers=1", "loss.disc_width=16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(out=str(out), num=24, sizes=["32"], per_shard=6, format="png"))
    return str(out / "shapes-{000000..000003}.tar")


@rank_entry
def _rank(rank, world, port, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    train(load(TokenizerTrainConfig, [], overrides))


def _run2(overrides):
    spawn_ranks(_rank, (2, free_port(), overrides), 2)


def _log(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _untimed(record):
    return {k: v for k, v in record.items()
            if k not in ("time", "step_time_s", "data_wait_frac", "items_per_s_rank", "items_per_s")}


def _ema(out_dir, step):
    shared = torch.load(os.path.join(out_dir, "checkpoints", tag_for(step), "shared.pt"), weights_only=True)
    return shared


@pytest.mark.slow
def test_two_rank_zero2_checkpoint_resume_continues_exactly(shards, tmp_path):
    base = TINY + [f"data.shards={shards}", "deepspeed.zero_stage=2", "checkpoint.every=2", "checkpoint.keep_last=2"]
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    _run2(base + [f"run_dir={resumed}", "steps=3"])
    # As a kill while writing the checkpoint of step 3 leaves it: no marker, step 3 logged.
    os.remove(os.path.join(resumed, "checkpoints", tag_for(3), MARKER))
    _run2(base + [f"run_dir={resumed}", "steps=4"])  # resumes from step 2
    _run2(base + [f"run_dir={straight}", "steps=4"])
    log_r, log_s = _log(resumed), _log(straight)
    # The step counter continues, and the log reads like the uninterrupted run's: step 3,
    # logged before the "kill" and again after the resume, appears once.
    assert [r["step"] for r in log_r] == [1, 2, 3, 4]
    # Same metrics after the resume as without interruption (timings aside): weights, Adam, LR,
    # EMA, the discriminator, the data position and RNG all came back from the checkpoint.
    assert [_untimed(r) for r in log_r] == [_untimed(r) for r in log_s]
    a, b = _ema(resumed, 4), _ema(straight, 4)
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    assert torch.equal(a["disc"]["net"]["net.0.weight"], b["disc"]["net"]["net.0.weight"])
    ranks = [json.load(open(os.path.join(resumed, "checkpoints", tag_for(4), f"rank_0000{r}.json")))
             for r in range(2)]
    assert [r["state"]["step"] for r in ranks] == [4, 4]
    # 24 samples in 4 shards, 2 ranks: each rank read its own 2 shards, 4 x 2 images so far.
    assert all(r["state"]["stream"]["0"]["offset"] == 2 and r["state"]["stream"]["0"]["shard"] == 1
               for r in ranks)
    # The save of step 4 pruned the incomplete step 3; keep_last=2 keeps the complete 2 and 4.
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == [
        "model_shapes.json", OWNER_NAME, tag_for(2), tag_for(4)]
    assert os.path.exists(os.path.join(resumed, "images", f"step_{4:09d}.png"))
    assert log_r[-1]["bits_outside_5_95"] >= 0 and 0 <= log_r[-1]["bit_rate/000"] <= 1
    # A 2-rank run's checkpoint exports in one process (it was refused for its world size).
    assert main(["--export-only"] + base + [f"run_dir={straight}"]) == 0
    exported = safetensors.torch.load_file(os.path.join(straight, "export", "model.safetensors"))
    assert torch.equal(exported["decoder.conv_out.weight"], b["ema"]["shadow"]["decoder.conv_out.weight"])


@pytest.mark.slow
def test_single_process_trains_and_exports(shards, tmp_path):
    from bdt.tokenizer.io import load_tokenizer

    out = str(tmp_path / "run")
    args = TINY + [f"data.shards={shards}", f"run_dir={out}", "steps=3", "checkpoint.every=10",
                   "loss.disc_weight=0", "optim.lr=3e-3"]
    os.environ.pop("WORLD_SIZE", None), os.environ.pop("RANK", None), os.environ.pop("MASTER_PORT", None)
    train(load(TokenizerTrainConfig, [], args))
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert os.path.exists(os.path.join(out, "config.yaml"))
    tok = load_tokenizer(os.path.join(out, "export"))
    bits = tok.encode(torch.zeros(1, 3, 16, 16))
    assert bits.shape == (1, 8, 8, 8) and bits.dtype == torch.bool
    # The export holds the EMA weights of the last checkpoint.
    ema = _ema(out, 3)["ema"]["shadow"]
    assert torch.equal(tok.state_dict()["decoder.conv_out.weight"], ema["decoder.conv_out.weight"])
    torch.manual_seed(0)  # the trainer's init seed: the export must differ from the initial weights
    init = BinaryAutoencoder(tok.config).state_dict()
    assert not torch.equal(init["decoder.conv_out.weight"], ema["decoder.conv_out.weight"])
    # Export on request from the newest complete checkpoint, without training.
    shutil.rmtree(os.path.join(out, "export"))
    assert main(["--export-only"] + args) == 0
    again = load_tokenizer(os.path.join(out, "export")).state_dict()
    assert torch.equal(again["decoder.conv_out.weight"], ema["decoder.conv_out.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_saves_and_says_so_in_the_summary(shards, tmp_path, sig, workers):
    """SIGTERM to the trainer, or Ctrl-C (SIGINT to its process group, loader workers included:
    before, KeyboardInterrupt ended the trainer mid-step): the step is saved, nothing exported,
    and summary.json says stopped (the resume wrapper tells a stop, which it requeues, from a
    finished run by it). The record logged at the stop, off the log schedule, is dropped by the
    resume: the log reads as uninterrupted."""
    out = tmp_path / "run"
    args = [sys.executable, "tokenizers/train.py", *TINY, f"run_dir={out}", f"data.shards={shards}",
            "loss.disc_weight=0", "logging.every=1000", "checkpoint.every=2",
            f"data.num_workers={workers}"]
    proc = subprocess.Popen([*args, "steps=100000"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=terminal_job_signals,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / tag_for(2) / MARKER).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, sig) if workers else proc.send_signal(sig)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    step = summary["step"]
    assert summary["stopped"] is True and not summary["timed_out"]
    assert summary["saved_step"] == step >= 2 and (out / "checkpoints" / tag_for(step) / MARKER).exists()
    assert not (out / "export").exists()
    assert [(r["step"], r.get("window_partial")) for r in _log(out)] == [(step, True)]
    subprocess.run([*args, f"steps={step + 1}"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert [r["step"] for r in _log(out)] == [step + 1]
    assert json.loads((out / "summary.json").read_text())["stopped"] is False


@pytest.mark.slow
def test_schedule_steps_lets_a_stopped_run_resume_on_the_same_lr_curve(shards, tmp_path):
    """steps=2 with schedule_steps=5, resumed to steps=5, is the uninterrupted 5-step run
    (what bench/tokenizer_quality.py does to score a fixed step count); without
    schedule_steps a 3-step run trains its third step at the LR floor already."""
    base = TINY + [f"data.shards={shards}", "optim.schedule=cosine", "loss.disc_weight=0",
                   "checkpoint.every=10"]
    stopped, straight, short = (str(tmp_path / n) for n in ("stopped", "straight", "short"))

    def run1(overrides):  # a fresh process per run: DeepSpeed keeps process-group state
        spawn_ranks(_rank, (1, free_port(), base + overrides), 1)

    run1([f"run_dir={stopped}", "steps=2", "schedule_steps=5"])
    run1([f"run_dir={stopped}", "steps=5"])
    run1([f"run_dir={straight}", "steps=5"])
    run1([f"run_dir={short}", "steps=3"])
    log_a, log_b = _log(stopped), _log(straight)
    assert [r["step"] for r in log_a] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in log_a] == [r["lr"] for r in log_b]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    # the LR each step applied (TINY: optim.lr 1e-3, 1 warmup step; the default floor 0.1)
    assert [r["lr"] for r in log_a] == [1e-3 * WarmupSchedule(1, 5, "cosine", 0.1)(i)
                                        for i in range(5)]
    assert [r["lr"] for r in _log(short)] == [1e-3 * WarmupSchedule(1, 3, "cosine", 0.1)(i)
                                              for i in range(3)]
    assert _log(short)[2]["lr"] < log_a[2]["lr"]
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", f"data.shards={shards}", "schedule_steps=-1"])


@pytest.mark.slow
def test_accumulating_half_batches_logs_the_full_batchs_curve(shards, tmp_path):
    """grad_accum=2 over 2 images is the step of 1 over the same 4, up to float drift (losses,
    psnr, ssim: per-image means; the bit rates: per-token; the quantizer's batch entropies are
    per micro-batch by nature: left out). The log once showed the last micro-batch's losses
    only, and later still its psnr, ssim and bit rates."""
    base = TINY + [f"data.shards={shards}", "steps=3", "loss.disc_weight=0",
                   "loss.quantizer_weight=0", "checkpoint.every=0"]
    runs = {"full": ["deepspeed.micro_batch_size=4"],
            "halves": ["deepspeed.micro_batch_size=2", "deepspeed.grad_accum=2"]}
    for name, overrides in runs.items():  # a fresh process per run (DeepSpeed's group state)
        spawn_ranks(_rank, (1, free_port(), base + [f"run_dir={tmp_path / name}", *overrides]), 1)
    full, halves = _log(tmp_path / "full"), _log(tmp_path / "halves")
    rates = [k for k in full[0] if k.startswith("bit_rate/")]
    for key in ("loss", "rec_loss", "grad_norm", "psnr", "ssim", "commit", *rates,
                "bits_rate_min", "bits_rate_max", "bits_outside_5_95"):
        assert [r[key] for r in halves] == pytest.approx([r[key] for r in full], rel=1e-3), key


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_the_bad_step(shards, tmp_path):
    # An absurd LR: step 1's update blows the weights up, step 2's loss is not finite.
    out = str(tmp_path / "run")
    args = TINY + [f"data.shards={shards}", f"run_dir={out}", "steps=4", "checkpoint.every=1",
                   "loss.disc_weight=0", "optim.lr=1e30"]
    # a fresh process: DeepSpeed keeps process-group state
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn_ranks(_rank, (1, free_port(), args), 1)
    assert re.search(r"TrainingDiverged: training diverged at step 2: non-finite values \(rank 0: "
                     r"micro-batch 0: loss=nan, rec_loss=nan, samples \d+, \d+\)\. Nothing of "
                     r"this step was saved; the newest checkpoint is step 1\. Lower the learning "
                     r"rate \(optim\.lr\)", str(raised.value))
    assert [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")] \
        == [tag_for(1)]
    assert os.path.exists(os.path.join(out, "checkpoints", tag_for(1), MARKER))
    assert not os.path.exists(os.path.join(out, "export"))


@rank_entry
def _rank_inf_grad(rank, overrides, network, at):
    """One plain process whose `at`-th backward pass through `network` (a class the loop builds)
    gives one weight of it an infinite gradient, the loss finite."""
    from bdt.training.tokenizer import gan, loop

    builder = {"BinaryAutoencoder": loop, "PatchDiscriminator": gan}[network]  # where it's built
    build, backward_calls = getattr(builder, network), []

    def inf_once(grad):
        backward_calls.append(1)
        return grad + math.inf if len(backward_calls) == at else grad

    def with_hook(*args):
        net = build(*args)
        next(net.parameters()).register_hook(inf_once)
        return net

    setattr(builder, network, with_hook)
    _rank.__wrapped__(rank, 1, free_port(), overrides)


@pytest.mark.slow
@pytest.mark.parametrize("network, at, what, extra", [
    # ZeRO-0 fp32 (TINY's): DeepSpeed reports no grad norm there.
    ("BinaryAutoencoder", 2, "gradient norm", ["loss.disc_weight=0"]),
    # The discriminator (TINY's starts at step 2) is stepped by hand.
    ("PatchDiscriminator", 1, "discriminator gradient norm", [])])
def test_an_infinite_gradient_behind_a_finite_loss_stops_the_run(shards, tmp_path, network, at,
                                                                   what, extra):
    # Unchecked, step 2's update (inf, clipped to NaN) was applied and saved, step 3's loss was
    # NaN, and the error named that NaN checkpoint as the newest.
    out = str(tmp_path / "run")
    args = TINY + [f"data.shards={shards}", f"run_dir={out}", "steps=4", "checkpoint.every=1",
                   *extra]
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn_ranks(_rank_inf_grad, (args, network, at), 1)
    assert f"training diverged at step 2: non-finite values (rank 0: {what} inf after a " \
           f"finite loss). Nothing of this step was saved; the newest checkpoint is step 1" \
           in str(raised.value)
    assert [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")] \
        == [tag_for(1)]
    assert 0 < _log(out)[0]["grad_norm"] < math.inf  # logged at ZeRO-0 too


@rank_entry
def _rank_hung_on(rank, world, port, overrides, hung):
    """_rank, with every read of the shard named `hung` blocking forever (a hung mount) in the
    DataLoader's workers, which are forked from this process."""
    from bdt.data import raw

    def read_samples(url, *args, **kwargs):
        while url.endswith(hung):
            time.sleep(1)
        return real(url, *args, **kwargs)

    real, raw.read_samples = raw.read_samples, read_samples
    # as under a launcher on Linux: a spawned rank's children would start from a fresh server
    multiprocessing.set_start_method("fork", force=True)
    _rank.__wrapped__(rank, world, port, overrides)


@pytest.mark.slow
def test_a_shard_whose_read_never_returns_stops_the_run_naming_where(shards, tmp_path):
    """Before: the trainer waited for the DataLoader's next batch for good."""
    args = TINY + [f"data.shards={shards}", "data.num_workers=1", "data.stall_s=3",
                   f"run_dir={tmp_path / 'run'}", "steps=40", "checkpoint.every=100"]
    with pytest.raises(mp.ProcessRaisedException) as raised:
        spawn_ranks(_rank_hung_on, (1, free_port(), args, "shapes-000002.tar"), 1)
    assert re.search(r"TimeoutError: DataLoader timed out after 3.0 seconds: no batch from the data "
                     r"workers, a read that does not return .* At or after, as of the last "
                     r"batches taken: worker 0: \S+/shapes-00000\d.tar after sample \d+\. "
                     r"Stopping", str(raised.value)), str(raised.value)[-2000:]


def test_bad_config_is_a_clear_error(shards, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", "data.shards=/nonexistent/x-{0..3}.tar", "steps=1"])
    assert "data.shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", f"data.shards={shards}", "loss.pixel=l3"])
    assert "loss.pixel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", f"data.shards={shards}", "loss.lpips_weight=1"])
    assert "loss.lpips_backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", "data.shards=x.tar", "model.bogus=1"])
    assert "model.bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the keys before both trainers shared one vocabulary
        main([f"out_dir={tmp_path}", f"data.shards={shards}"])
    assert "key 'out_dir' was renamed to 'run_dir'" in capsys.readouterr().err
    # the discriminator: once a crash when it first ran, loss.disc_start steps in
    disc = [f"run_dir={tmp_path}", f"data.shards={shards}", "loss.disc_weight=0.1"]
    with pytest.raises(SystemExit):
        main([*disc, "data.size=16", "loss.disc_layers=3"])
    assert "loss.disc_layers = 3 needs crops of at least 24 px" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*disc, "loss.disc_width=100"])
    assert "loss.disc_width = 100: its layer 1 has 200 channels" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # overrides may come after an option (once 'unrecognized')
        main([f"run_dir={tmp_path}", "--export-only"])  # the export reads no data.shards
    assert "no usable checkpoint under" in capsys.readouterr().err
    (tmp_path / "export").write_text("x")  # found at start, not after the whole run
    with pytest.raises(SystemExit):
        main([f"run_dir={tmp_path}", f"data.shards={shards}", "steps=1"])
    assert "export is a file, where the run writes its export" in capsys.readouterr().err


def test_the_shard_list_a_checkpoint_records_is_the_files(shards, tmp_path, monkeypatch):
    """What a resume compares (`data.shards` in the marker) names the files: the same shards
    named relative to another directory are the same list, a copy elsewhere with the same
    names is not (the comparison once took the names as written)."""
    from bdt.training.tokenizer.loop import _data_order

    def order(spec):
        return _data_order(load(TokenizerTrainConfig, [],
                                [f"data.shards={spec}", f"run_dir={tmp_path}"]))

    saved = order(shards)
    folder, pattern = os.path.split(shards)
    monkeypatch.chdir(os.path.dirname(folder))
    assert order(os.path.join(os.path.basename(folder), pattern)) == saved
    shutil.copytree(folder, tmp_path / os.path.basename(folder))
    monkeypatch.chdir(tmp_path)
    assert order(os.path.join(os.path.basename(folder), pattern)) != saved


@pytest.mark.slow
def test_resume_is_exact_with_workers_and_noise_and_follows_a_changed_config(shards, tmp_path):
    """Two DataLoader workers and a generative (noise-input) decoder at ZeRO-1: a run checkpointed
    at step 1 (worker 1 had given no batch yet) and resumed to step 3 (worker 1's turn first)
    repeats the uninterrupted run bitwise. A resume with another LR and schedule runs its first
    step at the config's LR (DeepSpeed restores the optimizer's, the saved LR, after the
    scheduler); one with another ZeRO stage, data seed or shard list is refused by name."""
    base = TINY + [f"data.shards={shards}", "data.num_workers=2", "model.gan_decoder=true",
                   "checkpoint.every=1", "deepspeed.zero_stage=1"]
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")

    def run1(overrides):  # a fresh process per run: DeepSpeed keeps process-group state
        spawn_ranks(_rank, (1, free_port(), base + overrides), 1)

    run1([f"run_dir={resumed}", "steps=1"])
    run1([f"run_dir={resumed}", "steps=3"])
    run1([f"run_dir={straight}", "steps=3"])
    assert [(r["loss"], r.get("d_loss")) for r in _log(resumed)] == \
        [(r["loss"], r.get("d_loss")) for r in _log(straight)]
    a, b = _ema(resumed, 3), _ema(straight, 3)
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    run1([f"run_dir={resumed}", "steps=4", "optim.lr=2e-3", "optim.schedule=cosine", "loss.disc_lr=3e-4"])
    assert _log(resumed)[-1]["lr"] == 2e-3 * WarmupSchedule(1, 4, "cosine", 0.1)(3)
    assert _ema(resumed, 4)["disc"]["sched"] == {"last_epoch": 3}  # the position only
    with pytest.raises(Exception, match="deepspeed.zero_stage=1; this run has deepspeed.zero_stage=2"):
        run1([f"run_dir={resumed}", "steps=5", "deepspeed.zero_stage=2"])
    # The stream's positions index the seeded order of this shard list: another is refused,
    # naming each key with the checkpoint's value and the config's.
    fewer = shards.replace("000003", "000002")
    marker = json.load(open(os.path.join(resumed, "checkpoints", tag_for(4), MARKER)))
    assert marker["settings"]["data.seed"] == 0
    assert marker["settings"]["data.shards"].startswith("4 shards ")
    with pytest.raises(Exception, match=r"written with data.shards='4 shards .*', data.seed=0; this "
                                        r"run has data.shards='3 shards .*', data.seed=1: resume"):
        run1([f"run_dir={resumed}", "steps=5", "data.seed=1", f"data.shards={fewer}"])
    assert sorted(r["step"] for r in _log(resumed)) == [1, 2, 3, 4]  # nothing trained


@pytest.mark.slow
def test_a_changed_model_shape_is_a_config_error_not_damage(shards, tmp_path):
    """A resume with another model.ch: one error naming a parameter, not every checkpoint
    reported as 'loading failed'."""
    run = [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "steps=1", "loss.disc_weight=0"]
    spawn_ranks(_rank, (1, free_port(), run), 1)
    with pytest.raises(mp.ProcessRaisedException, match="from a different model: parameter "
                                                         "'encoder.conv_in.weight'"):
        spawn_ranks(_rank, (1, free_port(), [*run, "steps=2", "model.ch=64"]), 1)


@pytest.mark.slow
def test_a_refused_worker_count_leaves_the_runs_config_record(shards, tmp_path):
    """A resume with another data.num_workers is refused by name; the run's config.yaml (what
    the run's checkpoints are rebuilt from) is still the one they were trained with (the
    refusal once came after the refused config had replaced it). It is refused by the
    checkpoint's records, before any tensor is read: with its tensor files gone, the refusal is
    the same (it was "no usable checkpoint", the files missing)."""
    run = [*TINY, f"run_dir={tmp_path}", f"data.shards={shards}", "steps=1", "loss.disc_weight=0"]
    spawn_ranks(_rank, (1, free_port(), run), 1)
    recorded = (tmp_path / "config.yaml").read_text()
    ckpt = tmp_path / "checkpoints" / tag_for(1)
    shutil.rmtree(ckpt / "autoencoder")
    for name in ("rank_00000.safetensors", "shared.pt"):
        (ckpt / name).unlink()
    with pytest.raises(mp.ProcessRaisedException, match="data.num_workers: the checkpoint's stream "
                                                         "state has 1 worker.s., this run has 2"):
        spawn_ranks(_rank, (1, free_port(), [*run, "steps=2", "data.num_workers=2"]), 1)
    assert (tmp_path / "config.yaml").read_text() == recorded


def test_a_resumed_discriminator_follows_the_configs_lr_and_schedule():
    """Its optimizer state holds the saved LR; the first resumed step runs at the config's."""
    old = load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x", "steps=10",
                                          "optim.warmup_steps=1", "loss.disc_lr=1e-4"])
    new = load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x", "steps=20",
                                          "optim.warmup_steps=1", "loss.disc_lr=3e-4"])
    disc = Discriminator(old, 3)
    for _ in range(4):
        disc.opt.step()
        disc.sched.step()
    resumed = Discriminator(new, 3)
    resumed.load_state_dict(disc.state_dict())
    assert resumed.opt.param_groups[0]["lr"] == 3e-4 * WarmupSchedule(1, 20, "cosine", 0.1)(4)
    assert disc.opt.param_groups[0]["lr"] == 1e-4 * WarmupSchedule(1, 10, "cosine", 0.1)(4)


def test_a_changed_discriminator_shape_is_a_config_error():
    old = load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x", "loss.disc_width=16"])
    new = load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x", "loss.disc_width=8"])
    with pytest.raises(ValueError, match="loss.disc_width / loss.disc_layers .8 / 3."):
        Discriminator(new, 3).load_state_dict(Discriminator(old, 3).state_dict())
