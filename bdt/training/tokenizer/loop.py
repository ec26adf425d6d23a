"""The tokenizer training loop: `deepspeed tokenizers/train.py --config
configs/tokenizer/<name>.yaml [key=value]` (keys: config.py).

Also runs under torchrun and as one plain process. Losses (method §1): pixel L1/L2, optional
LPIPS, the quantizer's commitment + group-wise entropy terms, and an optional patch discriminator
(hinge, adaptive weight, start step, optional LeCam). EMA weights are checkpointed and exported.

Optimisers: ONE DeepSpeed engine for the autoencoder, and a plain torch AdamW for the
discriminator (gan.py says why not a second engine).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bdt import storage
from bdt.config import ConfigError, save_resolved
from bdt.entry import fail, setup_logging
from bdt.data.images import DECODE_VERSION
from bdt.data.raw import expand_shards, make_loader, shard_list_id
from bdt.data.stream_state import shard_names
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.tokenizer.config import TokenizerConfig
from bdt.tokenizer.discriminator import adaptive_weight, hinge_g_loss
from bdt.tokenizer.image_metrics import psnr, ssim, to_unit
from bdt.tokenizer.io import save_tokenizer
from bdt.tokenizer.lpips import LPIPS
from bdt.training.checkpoint import SHARED_FILE, CheckpointManager
from bdt.training.deepspeed_config import build_ds_config, initialize_engine
from bdt.training.distributed import DistInfo, all_reduce_mean, cleanup, init_distributed
from bdt.training.divergence import StepHealth, TrainingDiverged, plain_grad_norm, raise_diverged
from bdt.training.ema import EMA
from bdt.training.integrity import MARKER, CheckpointUnusable, digest_bytes
from bdt.training.metrics import MetricsLogger, Throughput, Timer
from bdt.training.model_shapes import (check_model_signature, model_signature,
                                       record_model_signature)
from bdt.training.run_dir import LaunchRecord, checkpoint_root, export_dir, write_summary
from bdt.training.run_lock import hold_run_lock
from bdt.training.signals import DIVERGED, LOCAL_REASON, StopFlag, StoppedBeforeStart
from bdt.training.tokenizer.config import TokenizerTrainConfig, load_command, validate
from bdt.training.tokenizer.gan import Discriminator, lr_schedule
from bdt.training.tokenizer.resume_checks import resume_checks

log = logging.getLogger(__name__)


def _data_order(cfg: TokenizerTrainConfig) -> dict[str, str | int]:
    """What the stream positions a checkpoint holds index into (bdt/data/raw.py): the expanded
    shard list and the seed that shuffles it each epoch. (Crop size and resize change the
    pixels, not which sample comes next: the config's, like its LR.)"""
    urls = expand_shards(cfg.data.shards)
    names = shard_names(urls)  # the files, however the config names them
    return {"data.shards": f"{len(urls)} shards {names[0]} .. {names[-1]} (list sha256 "
                           f"{shard_list_id(urls)})",
            "data.seed": cfg.data.seed}


def training_checkpoints(cfg: TokenizerTrainConfig, dist: DistInfo) -> CheckpointManager:
    """The run's checkpoints, refusing by name a resume from ones of another ZeRO stage or
    precision (DeepSpeed cannot load their engine), shard order (the stream's positions index
    one) or image decoding (the images trained on so far decoded to other pixels)."""
    return CheckpointManager(checkpoint_root(cfg.run_dir, cfg.checkpoint.dir), dist,
                             cfg.checkpoint.keep_last, cfg.checkpoint.staging_dir or None,
                             settings={"deepspeed.zero_stage": cfg.deepspeed.zero_stage,
                                       "deepspeed.precision": cfg.deepspeed.precision,
                                       **_data_order(cfg)},
                             versions={"data.decode_version": (
                                 DECODE_VERSION, "bdt/data/images.py DECODE_VERSION: some images "
                                                 "now decode to other pixels")})


def _pixel_loss(kind: str, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)


def save_grid(path: str, images: torch.Tensor, recon: torch.Tensor) -> None:
    """Originals on the top row, reconstructions below, as one PNG."""
    rows = torch.cat([torch.cat(list(to_unit(images)), dim=2), torch.cat(list(to_unit(recon)), dim=2)], dim=1)
    arr = (rows.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def export(model_cfg: TokenizerConfig, ema_state: dict, run_dir: str) -> str:
    """Write the EMA weights as a tokenizer directory (config.json + model.safetensors);
    ValueError, with nothing written, when they are not this model's (EMA.load_state_dict)."""
    model = BinaryAutoencoder(model_cfg)
    ema = EMA(model, decay=0.0)
    ema.load_state_dict(ema_state)
    model.load_state_dict(ema.module_state_dict(model))
    path = export_dir(run_dir)
    with storage.naming_url(path, "exporting the tokenizer to"):  # a full disk: where
        save_tokenizer(model, path)
    return path


QUANT_LOGGED = ("commitment_loss", "entropy_loss", "bit_rates", "group_code_entropy")


def loss_networks(cfg: TokenizerTrainConfig, out_ch: int, device: torch.device
                  ) -> tuple[Discriminator | None, LPIPS | None]:
    """The discriminator and LPIPS where the config weighs them, on `device` (the engine's:
    on a GPU the reconstructions they take are there)."""
    disc = Discriminator(cfg, out_ch, device) if cfg.loss.disc_weight > 0 else None
    lpips = (LPIPS.from_local(cfg.loss.lpips_backbone, cfg.loss.lpips_head).to(device)
             if cfg.loss.lpips_weight > 0 else None)
    return disc, lpips


def _step_metrics(seen: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> dict[str, float]:
    """psnr, ssim and the quantizer's metrics of a step: each the mean over its micro-batches
    (`seen`: recon, images, the quantizer's QUANT_LOGGED of each). Micro-batches are of one
    size, so the per-bit rates are the step's; min, max and outside 5-95% are of those."""
    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v.float() for v in values]).mean(0)

    q = {k: mean([quant[k] for _, _, quant in seen]) for k in QUANT_LOGGED}
    rates, ent = q["bit_rates"], q["group_code_entropy"]
    out = {"psnr": mean([psnr(r, i).mean() for r, i, _ in seen]).item(),
           "ssim": mean([ssim(r, i).mean() for r, i, _ in seen]).item(),
           "commit": q["commitment_loss"].item(), "entropy": q["entropy_loss"].item(),
           "bits_rate_min": rates.min().item(), "bits_rate_max": rates.max().item(),
           "bits_outside_5_95": ((rates < 0.05) | (rates > 0.95)).float().sum().item(),
           "group_entropy_min": ent.min().item(), "group_entropy_mean": ent.mean().item()}
    out.update({f"bit_rate/{i:03d}": r for i, r in enumerate(rates.tolist())})
    out.update({f"group_entropy/{i:02d}": e for i, e in enumerate(ent.tolist())})
    return out


def train(cfg: TokenizerTrainConfig, on_set_up: Callable[[bool], None] | None = None) -> dict:
    """Run (or resume) training until cfg.steps; returns the last logged metrics. `on_set_up`
    (is this rank 0) is called once the model, the resume and the data stream are ready.
    StoppedBeforeStart for a stop signal before the first step (signals.py)."""
    stop, lock = StopFlag(started=False), None
    try:
        model_cfg = validate(cfg)
        dist: DistInfo = init_distributed()
        lock = hold_run_lock(cfg.run_dir, dist)  # one job per run_dir: a second one stops here
        return _train(cfg, model_cfg, dist, on_set_up or (lambda is_main: None), stop)
    except BaseException as e:
        stop.settle()  # ending: a stop before step 1 is not raised again in the clean-up
        if isinstance(e, StoppedBeforeStart) and lock is not None:  # a wrapper reads "stopped"
            write_summary(cfg.run_dir, None, stopped=True, timed_out=False, saved_step=None)
            e.recorded = True
        raise
    finally:
        if lock is not None:
            lock.release()
        stop.restore()  # last: a second stop signal while stopping must not kill the release


def _train(cfg: TokenizerTrainConfig, model_cfg: TokenizerConfig, dist: DistInfo,
           on_set_up: Callable[[bool], None], stop: StopFlag) -> dict:
    ckpt = training_checkpoints(cfg, dist)
    ckpt.bind(cfg.run_dir, cfg.checkpoint.adopt)  # another run's checkpoint root: refused here
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = BinaryAutoencoder(model_cfg)
    engine = initialize_engine(model, build_ds_config(cfg.deepspeed, cfg.optim, dist.world_size),
                               lr_schedule(cfg))
    ema = EMA(engine.module, cfg.ema_decay)
    disc, lpips = loss_networks(cfg, model_cfg.out_ch, dist.device)
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # per-rank stream for any sampling in the step
    # The whole model config: norm_groups shapes no parameter but changes every activation.
    signature = model_signature(engine.module, model_cfg.to_dict())
    check_model_signature(ckpt.root, signature, dist)
    step, stream_state, tag = 0, None, None
    # The newest checkpoint that verifies and loads; damaged newer ones are reported, skipped.
    resumed = ckpt.resume({"autoencoder": engine}, fresh=not cfg.checkpoint.resume,
                          before_load=resume_checks(cfg))
    record_model_signature(ckpt.root, signature, dist)  # the checkpoint loaded: the shapes fit
    if resumed is not None:
        tag, meta, shared = resumed.tag, resumed.meta, resumed.shared
        step, stream_state = meta["step"], meta["stream"]
        engine.lr_scheduler.write_lrs()  # the config's LR at the restored step (schedule.py)
        ema.load_state_dict(shared["ema"])
        if disc is not None and "disc" in shared:
            disc.load_state_dict(shared["disc"])
    # This rank's own saved stream (rank 0's passed resume_checks), checked again here: before
    # the config is recorded, or a refused config would replace the record of the run's checkpoints.
    loader, stream = make_loader(cfg.data, cfg.deepspeed.micro_batch_size, dist.rank,
                                 dist.world_size, stream_state)
    if dist.is_main:
        save_resolved(cfg, cfg.run_dir)
        log.info("tokenizer training: world %d, start step %d%s", dist.world_size, step,
                 f" (resumed from {tag})" if tag else "")
    on_set_up(dist.is_main)
    # Records an earlier run logged past the start step are replaced by this run's.
    logger = MetricsLogger(cfg.run_dir, dist.is_main, cfg.logging.tensorboard,
                           keep_through_step=step if resumed is not None else -1)
    stop.start()
    health = StepHealth()
    saved_step = step if resumed is not None else -1
    meter = Throughput()
    batches = iter(loader)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
    last_layer = engine.module.decoder.conv_out
    last_input: dict[str, torch.Tensor] = {}  # conv_out's input in the current forward
    last_layer.register_forward_hook(lambda m, inp, out: last_input.update(x=inp[0]))
    accum = cfg.deepspeed.grad_accum
    # DeepSpeed reports no grad norm for plain fp32 gradients (ZeRO-0): read off them instead,
    # or an infinite gradient behind a finite loss is applied and saved (divergence.py).
    plain_grads = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"
    last: dict = {}
    started = time.monotonic()
    stopped = timed_out = False

    def save() -> None:
        nonlocal saved_step
        shared = {"ema": ema.state_dict()}
        if disc is not None:
            shared["disc"] = disc.state_dict()
        ckpt.save(step, {"autoencoder": engine}, {"step": step, "stream": stream.to_dict()},
                  shared=shared)
        saved_step = step

    try:
        while step < cfg.steps:
            gan_on = disc is not None and step >= cfg.loss.disc_start
            health.reset()
            means: dict[str, float] = {}  # the step's loss terms, over its micro-batches
            seen = []  # what the logged image and quantizer metrics average over (_step_metrics)
            for micro in range(accum):
                with Timer() as wait:
                    batch = stream.take(batches)
                meter.add_data_wait(wait.seconds)
                images = batch["images"].to(dist.device)
                recon_raw, q = engine(images.to(dtype))
                # A copy node after the engine's output: the adaptive GAN weight differentiates
                # w.r.t. `recon` without reaching the output tensor, on which DeepSpeed hangs its
                # backward hooks (reaching it would run DeepSpeed's gradient epilogue early).
                recon = recon_raw.to(torch.float32, copy=True)
                rec = cfg.loss.pixel_weight * _pixel_loss(cfg.loss.pixel, recon, images)
                if lpips is not None:
                    rec = rec + cfg.loss.lpips_weight * lpips(recon, images).mean()
                loss = rec + cfg.loss.quantizer_weight * q.loss
                terms = {"rec_loss": rec.item()}
                if gan_on:
                    disc.net.requires_grad_(False)
                    g_loss = hinge_g_loss(disc.net(recon))
                    disc.net.requires_grad_(True)
                    w = (adaptive_weight(rec, g_loss, last_layer, last_input["x"], recon)
                         if cfg.loss.disc_adaptive else 1.0)
                    loss = loss + cfg.loss.disc_weight * w * g_loss
                    terms.update(g_loss=g_loss.item(), d_weight=float(w))
                engine.backward(loss)
                if plain_grads and engine.is_gradient_accumulation_boundary():
                    plain_norm = plain_grad_norm(engine.module)
                step_lr = engine.get_lr()[0]  # this step's LR: engine.step moves it on
                engine.step()
                if gan_on:
                    terms.update(disc.step(images, recon.detach(), cfg.loss.lecam_weight, 1.0 / accum))
                seen.append((recon.detach(), images, {k: getattr(q, k).detach() for k in QUANT_LOGGED}))
                terms = {"loss": loss.item(), **terms}
                health.check_losses(terms, f"micro-batch {micro}", batch["keys"])
                for k, v in terms.items():
                    means[k] = means.get(k, 0.0) + v / accum
            norm = plain_norm if plain_grads else engine.get_global_grad_norm()
            health.check_grad_norm(None if norm is None else float(norm))
            if gan_on:
                health.check_grad_norm(disc.apply(dist.world_size, cfg.optim.grad_clip),
                                       "discriminator gradient norm")
            ema.update(engine.module)
            step += 1
            meter.add_step(images.shape[0] * accum)
            over_time = cfg.time_limit_min > 0 and time.monotonic() - started > cfg.time_limit_min * 60
            # One collective for both reasons: every rank stops at the same step.
            stopping = stop.should_stop(dist.device, local=over_time, diverged=health.bad)
            if step % cfg.logging.every == 0 or step == cfg.steps or stopping:
                with torch.no_grad():
                    values = {**means, **_step_metrics(seen)}
                values = all_reduce_mean(values, dist.device)
                values.update(lr=step_lr, corrupt=stream.corrupt, **meter.report(dist.world_size))
                if norm is not None:
                    values["grad_norm"] = float(norm)
                if step % cfg.logging.every and step != cfg.steps:  # a stop off the schedule:
                    values["window_partial"] = True  # its resume drops it, as the AR loop's
                logger.log(step, values)
                last = values
            if stopping == DIVERGED:
                raise_diverged(health, step, saved_step, "Lower the learning rate (optim.lr) or "
                               "look at those images, then resume.")
            if dist.is_main and cfg.logging.image_every and step % cfg.logging.image_every == 0:
                n = cfg.logging.num_images
                save_grid(os.path.join(cfg.run_dir, "images", f"step_{step:09d}.png"),
                          images[:n], recon[:n].detach())
            if (stopping or step == cfg.steps
                    or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                save()
            if stopping:
                timed_out = stopping == LOCAL_REASON  # collective: the same on every rank
                stopped = not timed_out
                if dist.is_main:
                    log.info("%s: saved step %d", "time limit" if timed_out else "stop signal", step)
                break
        if dist.is_main:
            if not stopped:  # finished, or cut short by its time limit: export either way
                log.info("exported EMA tokenizer to %s",
                         export(model_cfg, ema.state_dict(), cfg.run_dir))
            write_summary(cfg.run_dir, step, stopped, timed_out, saved_step=saved_step)
    finally:
        logger.close()
    cleanup()
    return last


def export_latest(cfg: TokenizerTrainConfig) -> str:
    """Export the EMA weights of the newest complete checkpoint whose shared file verifies (no
    training, no DeepSpeed; a checkpoint of any world size: no rank file or engine is read)."""
    solo = DistInfo(0, 1, 0, torch.device("cpu"))
    ckpt = CheckpointManager(checkpoint_root(cfg.run_dir, cfg.checkpoint.dir), solo,
                             staging_dir=cfg.checkpoint.staging_dir or None)
    model_cfg = TokenizerConfig.from_dict(cfg.model)
    # A config that differs from the run's (norm_groups: the weights load, the encoder differs)
    # would export a tokenizer the checkpoints were never trained as.
    with torch.device("meta"):  # shapes only: the export builds the real one
        shapes_only = BinaryAutoencoder(model_cfg)
    check_model_signature(ckpt.root, model_signature(shapes_only, model_cfg.to_dict()), solo)
    problems = []
    for tag in reversed([t for _, t, done in ckpt.list_tags() if done]):
        try:
            ema = _read_shared(ckpt, tag).get("ema")
            try:
                return export(model_cfg, ema, cfg.run_dir)
            except ValueError as e:  # its EMA weights are not this model's, or not finite
                raise CheckpointUnusable(f"{tag}: {e}") from None
        except CheckpointUnusable as e:
            log.warning("checkpoint skipped: %s", e)
            problems.append(str(e))
    raise ValueError(f"no usable checkpoint under {ckpt.root} to export"
                     + "".join(f"; {p}" for p in problems))


def _read_shared(ckpt: CheckpointManager, tag: str) -> dict:
    """`tag`'s shared state (EMA, discriminator), checked against its marker."""
    url = storage.join(ckpt.root, tag, SHARED_FILE)
    entry = (ckpt.read_marker(tag).get("files") or {}).get(SHARED_FILE)
    try:
        data = storage.read_bytes(url)
    except OSError as e:
        raise CheckpointUnusable(f"{url}: cannot be read ({e})") from None
    if entry is None or digest_bytes(data) != entry:
        raise CheckpointUnusable(f"{url}: not listed in its {tag}/{MARKER} marker, or differs "
                                 f"from it (damaged or replaced)")
    try:
        shared = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses what is not plain data
        raise CheckpointUnusable(f"{url}: not a torch file of tensors and plain data "
                                 f"({type(e).__name__}; it is never unpickled)") from None
    if not isinstance(shared, dict):
        raise CheckpointUnusable(f"{url}: holds a {type(shared).__name__}, not a dict")
    return shared


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    launch = LaunchRecord()
    try:
        cfg, export_only = load_command(sys.argv[1:] if argv is None else argv)
        if export_only:
            print(export_latest(cfg))
        else:
            launch.run_dir = cfg.run_dir
            train(cfg, launch.set_up)
    except (ConfigError, ValueError, *storage.STORE_ERRORS) as exc:  # botocore's are no OSError
        launch.failed(exc)
        fail(str(exc))
    except TrainingDiverged as exc:  # names the step, ranks, values and images
        fail(str(exc), code=1)
    except RuntimeError as exc:  # a rank that lost another: one line, not a transport traceback
        from bdt.training.distributed import lost_peer_line

        if (line := lost_peer_line(exc)) is None:
            raise
        fail(line, code=1)
    except StoppedBeforeStart as exc:  # a rerun resumes as usual
        log.warning("%s", exc)
        return exc.exit_code
    return 0
