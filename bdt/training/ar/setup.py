"""Building a training job's parts, with the start-up checks that turn bad input into one clear
error: shard sources, image-tokenizer identity, bits per token, model shape vs. checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tarfile
import types
from collections.abc import Mapping
from typing import NamedTuple

import torch

from bdt import output_dirs, storage
from bdt.data.shard_source import ShardList, list_shards
from bdt.data.stream_state import same_stream
from bdt.data.token_shards import TokenSample, iter_token_shard
from bdt.data.token_stream import TokenStream
from bdt.model.ar import LLM_DIR, WEIGHTS_NAME, BitDanceModel, read_model_config
from bdt.model.keymap import release_layout
from bdt.model.sequence import SequencePacker, patch_side
from bdt.training.distributed import DistInfo
from bdt.training.ar.stage_rows import CaptionMeasure, StageRows
from bdt.training.ar.config import TrainConfig, stage_p
from bdt.training.ar.run_tokenizer import RunTokenizer, agreeing_tokenizer, configured_tokenizer
from bdt.training.run_dir import CONFIG_NAME, EXPORT_IMAGE_TOKENIZER_DIR, export_dir, read_config

log = logging.getLogger(__name__)


def resolve_init_from(cfg: TrainConfig) -> None:
    """`init_from` (an export) supplies the backbone and, unless given, the image tokenizer;
    ValueError / FileNotFoundError when the config contradicts it or it is not an export."""
    if not cfg.init_from:
        return
    # The run's end replaces its export/: started from it, a run replaced the model it came from.
    if not storage.is_remote(cfg.init_from) and os.path.realpath(storage.local_path(
            cfg.init_from)) == os.path.realpath(storage.local_path(export_dir(cfg.run_dir))):
        raise ValueError(f"init_from={cfg.init_from} is this run's own export, which the run "
                         f"replaces when it ends: copy it elsewhere and set init_from to the copy")
    backbone, llm = cfg.model.backbone, storage.join(cfg.init_from, LLM_DIR)
    if backbone.path not in ("", llm) or backbone.from_scratch:  # (a resolved config has llm)
        raise ValueError(f"init_from={cfg.init_from} gives the backbone (its {LLM_DIR}/): leave "
                         f"model.backbone.path empty (it is {backbone.path!r}) and "
                         f"model.backbone.from_scratch false")
    missing = [n for n in (WEIGHTS_NAME, f"{LLM_DIR}/config.json")
               if not storage.exists(storage.join(cfg.init_from, n), "reading init_from")]
    if missing:
        layout = release_layout(cfg.init_from)
        raise FileNotFoundError(
            f"init_from={cfg.init_from} is not a bdt model export (no {', '.join(missing)}): "
            + (f"it is {layout.name}; convert it once with `bdt model "
               "import-bitdance --src ... --out DIR` and set init_from=DIR" if layout else
               "give a run's export/ or the output of `bdt model import-bitdance`"))
    backbone.path = llm
    if not cfg.data.tokenizer:
        tokenizer = storage.join(cfg.init_from, EXPORT_IMAGE_TOKENIZER_DIR)
        # a run without data.tokenizer exports none
        if not storage.exists(tokenizer, "reading init_from"):
            raise FileNotFoundError(f"init_from={cfg.init_from} has no "
                                    f"{EXPORT_IMAGE_TOKENIZER_DIR}/ (its run named no "
                                    f"data.tokenizer): set data.tokenizer to the image "
                                    f"tokenizer of the token shards")
        cfg.data.tokenizer = tokenizer
    # The architecture is the export's: its weights have no other shape.
    saved = read_model_config(cfg.init_from)
    for key in ("head", "parallel_num", "pos_max_len"):
        if getattr(cfg.model, key) != getattr(saved, key):
            log.info("init_from: model.%s is the export's, %s (the config said %s)", key,
                     getattr(saved, key), getattr(cfg.model, key))
            setattr(cfg.model, key, getattr(saved, key))


def earlier_init_from(run_dir: str) -> str | None:
    """The init_from of the run's last start (its config.yaml), None without a readable one: read
    before this start writes its own, to say when a resume keeps weights a new init_from meant to
    replace."""
    try:
        return str(read_config(os.path.join(run_dir, CONFIG_NAME)).get("init_from", ""))
    except (OSError, ValueError):
        return None


def set_threads(threads: int) -> None:
    """torch's intra-op threads of this rank (0: torch's default). More than the machine's CPUs
    never helps, and far more (threads=100000) crashed the rank with a segfault after 'Resource
    temporarily unavailable'; checked here, on the machine that runs the rank, not in validate
    (the cluster supervisor validates the config on its own machine)."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ValueError(f"threads = {threads} exceeds this machine's {cpus} CPUs")
    if threads > 0:
        torch.set_num_threads(threads)


def check_copied_folders(cfg: TrainConfig) -> None:
    """ValueError naming a link out of a folder the export copies (output_dirs.check_links):
    `data.tokenizer`, and the LLM's, whose text tokenizer saves its files again (a linked
    chat_template.jinja's text among them; its weights are saved from the tensors, so they may
    link to a shared store). Refused at start, not after hours of training."""
    output_dirs.check_links(cfg.data.tokenizer, "data.tokenizer")
    output_dirs.check_links(cfg.model.backbone.path, "model.backbone.path", weights_may_link=True)


def check_image_tokenizer(cfg: TrainConfig) -> None:
    """ValueError naming `data.tokenizer` when it does not load as sampling loads it (strict:
    bdt.tokenizer.io.load_tokenizer) or its bits per token are not model.head.bits. The export
    copies it: unchecked, a broken one replaced the export's image tokenizer and failed only at
    `bdt sample`. Not kept: a released tokenizer holds GBs that the model build wants."""
    from bdt.tokenizer.io import load_tokenizer

    path = cfg.data.tokenizer
    if not path:
        return
    try:
        decoder = load_tokenizer(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"data.tokenizer = {path} does not load: {e}") from None
    bits = decoder.config.bits_per_token
    if bits != cfg.model.head.bits:
        raise ValueError(f"data.tokenizer = {path} writes {bits}-bit tokens, model.head.bits is "
                         f"{cfg.model.head.bits}")


class CheckedData(NamedTuple):
    sources: list[ShardList]  # per stage
    tokenizer: RunTokenizer | None  # None: neither data.tokenizer nor a manifest names one


def check_data(cfg: TrainConfig) -> CheckedData:
    """Every stage's shard list and the image tokenizer they were written by; ValueError on a
    missing source, shards written by another image tokenizer than `data.tokenizer` (or than
    another stage's), or bits per token != the model's."""
    tokenizer = configured_tokenizer(cfg.data.tokenizer)
    out, factor = [], None
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}] ({stage.name})"
        try:
            shards = list_shards(stage.shards, stage.family, stage.allow_incomplete)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        tokenizer = agreeing_tokenizer(tokenizer, shards.manifest, where, stage.shards)
        url, first = _first_sample(shards.urls)
        if first is not None and first.bits_per_token != cfg.model.head.bits:
            raise ValueError(f"{where}: {url} holds {first.bits_per_token}-bit tokens, "
                             f"model.head.bits is {cfg.model.head.bits}")
        family = stage.family or next(iter((shards.manifest or {}).get("stages", {})), "")
        if first is not None and shards.manifest is not None and first.stage != family:
            raise ValueError(f"{where}: {url}, listed for family {family!r} in "
                             f"{stage.shards}/index.json, holds samples of family "
                             f"{first.stage!r}: the manifest was edited; rerun the extraction")
        side = patch_side(stage_p(cfg, i))
        if first is not None:
            factor = first.bucket[0] // first.grid[1]  # the image tokenizer's downsample factor
            try:
                grids = _stage_grids(shards, family, first.grid, factor)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            for h, w in grids:
                if h % side or w % side:
                    raise ValueError(f"{where}: {stage.shards} holds {h}x{w} token grids, not "
                                     f"divisible into the {side}x{side} patches of "
                                     f"P = {stage_p(cfg, i)}")
                if max(h, w) > cfg.model.pos_max_len:
                    raise ValueError(f"{where}: {stage.shards} holds {h}x{w} token grids, beyond "
                                     f"the 2D position table (model.pos_max_len = "
                                     f"{cfg.model.pos_max_len} tokens per side)")
            # A sample packs at least its image tokens: below the smallest grid every sample
            # would be skipped as oversize, found only after a whole epoch of reading (the
            # prompt and image prefix are counted once the model exists: check_budgets).
            h, w = min(grids, key=lambda g: g[0] * g[1])
            if h * w > stage.token_budget:
                raise ValueError(f"{where}.token_budget = {stage.token_budget} is smaller than "
                                 f"one sample: the image tokens of its smallest grid ({h}x{w}) "
                                 f"alone are {h * w}")
            shards = dataclasses.replace(shards, grids=grids)
        out.append(shards)
    _check_eval_size(cfg, factor)
    return CheckedData(out, tokenizer)


def _stage_grids(shards: ShardList, family: str, first_grid: tuple[int, int], factor: int
                 ) -> list[tuple[int, int]]:
    """The token grids a stage will pack: the first sample's and every bucket its extraction
    manifest lists for the family, so a later bucket cannot fail deep in packing."""
    stages = (shards.manifest or {}).get("stages", {})
    buckets = stages.get(family or next(iter(stages), ""), {}).get("buckets", [])
    ok = isinstance(buckets, list) and all(
        isinstance(b, list) and len(b) == 2 and all(type(v) is int and v > 0 and v % factor == 0
                                                    for v in b) for b in buckets)
    if not ok:
        raise ValueError(f"{shards.source}/index.json: family {family!r} lists the buckets "
                         f"{str(buckets)[:200]}, not [W, H] px multiples of the shards' "
                         f"downsample factor {factor}: rerun the extraction")
    return sorted({first_grid} | {(H // factor, W // factor) for W, H in buckets})


def _check_eval_size(cfg: TrainConfig, factor: int | None) -> None:
    """In-loop evaluation samples eval.width x eval.height px at model.parallel_num: a size
    that is not whole patches is refused at start, not at the first evaluation."""
    if cfg.eval.every <= 0 or factor is None:
        return
    unit = factor * patch_side(cfg.model.parallel_num)
    for key in ("width", "height"):
        px = getattr(cfg.eval, key)
        if px % unit:
            raise ValueError(f"eval.{key} = {px} px is not a multiple of {unit} (tokenizer "
                             f"downsample {factor} x the patch side of model.parallel_num = "
                             f"{cfg.model.parallel_num})")
        if px // factor > cfg.model.pos_max_len:
            raise ValueError(f"eval.{key} = {px} px is {px // factor} tokens, beyond the 2D "
                             f"position table (model.pos_max_len = {cfg.model.pos_max_len})")


def _first_sample(urls: list[str], shards: int = 4) -> tuple[str, TokenSample | None]:
    """(shard, its first sample) of the first of `shards` shards whose first sample decodes: an
    empty or damaged first shard (the stream's business: skip and count) must not let a stage of
    another bit width pass the start checks and fail only after a whole epoch of skipping."""
    for url in urls[:shards]:
        try:
            return url, next(iter_token_shard(url))
        except (StopIteration, ValueError, OSError, tarfile.TarError, EOFError):
            continue
    return urls[0], None


def skip_deepspeed_muon(cfg: TrainConfig) -> None:
    """DeepSpeed's ZeRO-3 code imports its Muon optimizer module at start to recognise that
    optimizer, and that module torch.compiles kernels at import: ~1-3 s of CPU per rank per
    start, for an optimizer the run does not build. A stand-in module whose class nothing is an
    instance of keeps every `from ... import MuonWithAuxAdam` + isinstance check working. Not
    when the run chose Muon (`deepspeed.extra.optimizer.type`): DeepSpeed then builds it."""
    optimizer = dict(cfg.deepspeed.extra).get("optimizer")
    if isinstance(optimizer, Mapping) and str(optimizer.get("type", "")).lower() == "muon":
        return
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stub = types.ModuleType(name, "stand-in: this run does not use DeepSpeed's Muon optimizer")
        stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stub


def build_model(cfg: TrainConfig, ds_config: dict) -> tuple[BitDanceModel, object | None]:
    """The model, and (under ZeRO-3) the live HfDeepSpeedConfig the caller must keep referenced.

    ZeRO 0-2: built whole on every rank. ZeRO-3: no rank ever holds the whole LLM. A live
    `HfDeepSpeedConfig` makes transformers build and load the LLM inside `deepspeed.zero.Init`,
    straight into each rank's partition (transformers keeps only a weak reference to it: drop
    it and later HF calls stop treating the model as ZeRO-3). The resized embeddings (HF's resize
    makes them whole), connector and head are then partitioned in place with rank 0's values
    (`zero.Init(module=...)`). Those are whole on every rank for that moment: at BitDance-14B
    sizes about 1.6B embedding + 1.8B head parameters next to the 14B that never are (building
    the head inside zero.Init would need its DiT init re-run under a gather: not done).
    """
    if cfg.deepspeed.zero_stage != 3:
        return _initialised(cfg), None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)
    model = _initialised(cfg)
    if cfg.deepspeed.precision == "bf16":
        # The engine casts nothing of a model partitioned at init (zero.Init already gave the
        # LLM the configured dtype): our own modules must arrive in it. pos_embed holds only
        # a buffer, which stays fp32 as under ZeRO-0-2 (the engine casts parameters only).
        for module in (model.connector, model.pos_embed, model.head):
            module.to(torch.bfloat16)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)  # skips partitioned params
    return model, hf_ds


def _initialised(cfg: TrainConfig) -> BitDanceModel:
    """The model as configured, its connector and head from the export `init_from` when given
    (the LLM's weights came from its llm/ as the backbone), else freshly initialised."""
    if not cfg.init_from:
        return BitDanceModel.from_config(cfg.model)
    from bdt.weights import read_safetensors

    model = BitDanceModel.from_config(cfg.model, extra_on_meta=True)
    url = storage.join(cfg.init_from, WEIGHTS_NAME)
    model.load_extra(read_safetensors(url), url)
    return model


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, or everything."""
    return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
               for p in module.parameters())


def numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def check_budgets(cfg: TrainConfig, model: BitDanceModel, sources: list[ShardList]) -> None:
    """Every grid a stage will read (`ShardList.grids`) must pack: its sides need their
    <|res_k|> tokens in the model's vocabulary, and its smallest sample (an empty or dropped
    caption, the image prefix) must fit the stage's token_budget. Else every sample of that
    grid is skipped while training (as bad_grid or oversize): a whole bucket lost, or, for the
    smallest grid, the stage failing after an epoch of reading. Needs the model: the prompt
    template's ids and the res tokens."""
    for i, (stage, shards) in enumerate(zip(cfg.stages, sources)):
        where = f"stages[{i}] ({stage.name})"
        packer = stage_packer(model, stage_p(cfg, i), stage.token_budget, cfg.model.caption_dropout)
        prompt = min(len(packer.prompt_ids([])), len(packer.prompt_ids(None)))
        for k, (h, w) in enumerate(sorted(shards.grids or [], key=lambda g: g[0] * g[1])):
            try:
                packer.image_prefix_ids(h, w)
            except ValueError as e:
                raise ValueError(f"{where}: {stage.shards} holds {h}x{w} token grids: {e}") from None
            need = packer.sample_len(prompt, h, w)
            if need <= stage.token_budget:
                continue
            if k == 0:
                raise ValueError(f"{where}.token_budget = {stage.token_budget} is smaller than one "
                                 f"sample: its smallest ({h}x{w} tokens, no caption) packs {need} "
                                 f"with the prompt template and image prefix")
            raise ValueError(f"{where}.token_budget = {stage.token_budget} cannot hold a sample of "
                             f"its {h}x{w} token grids ({need} tokens with no caption), which "
                             f"{stage.shards} holds: every one would be skipped; raise the budget "
                             f"or extract without that bucket")


def stage_packer(model: BitDanceModel, parallel_num: int, token_budget: int,
                 caption_dropout: float) -> SequencePacker:
    """The packer of a stage training P = parallel_num <= the model's P: the image prefix holds
    the first P-1 of the model's query tokens (<|query_j|> has one id whatever P)."""
    P = parallel_num
    special = dataclasses.replace(model.special, query_ids=model.special.query_ids[:P - 1])
    return SequencePacker(special, model.prompt, P, max_len=token_budget,
                          caption_dropout=caption_dropout)


def stage_rows(cfg: TrainConfig, stage_idx: int, shards: ShardList, model: BitDanceModel,
               dist: DistInfo, state: tuple[dict, dict] | None = None) -> StageRows:
    """The recipe of the stage's rows (stream + packer; captions encoded once, when the stream
    measures), continuing from a checkpoint's stream `state` when given."""
    stage = cfg.stages[stage_idx]
    packer = stage_packer(model, stage_p(cfg, stage_idx), stage.token_budget,
                          cfg.model.caption_dropout)
    return StageRows(shards.urls, dist.rank, dist.world_size, stage.token_budget,
                     cfg.data.buffer_size, stream_seed(cfg, stage_idx), cfg.model.head.bits,
                     CaptionMeasure(model.tokenizer, packer, cfg.model.pos_max_len), state)


def make_stream(cfg: TrainConfig, stage_idx: int, shards: ShardList, model: BitDanceModel,
                dist: DistInfo) -> tuple[TokenStream, SequencePacker]:
    """The stage's data stream and packer, in this thread (benchmarks of the parts)."""
    rows = stage_rows(cfg, stage_idx, shards, model, dist)
    return rows.stream(), rows.measure.packer


def check_stream_state(cfg: TrainConfig, stage_idx: int, shards: ShardList, stream_meta: dict,
                       dist: DistInfo) -> None:
    """A checkpoint's stream continues only over the shards and seed it read (the stream checks
    it too, but later and without naming the stage): checked at the resume, before any step."""
    seed = stream_seed(cfg, stage_idx)
    if not same_stream(stream_meta, shards.urls, dist.rank, dist.world_size, seed):
        stage = cfg.stages[stage_idx]
        raise ValueError(f"stages.{stage_idx} ({stage.name!r}): the checkpoint's data stream was "
                         f"read from other shards than the {len(shards.urls)} that its shards "
                         f"{stage.shards!r} name now, or with another seed: resume with the "
                         f"stage's shards and the run's seed as they were, or start a new run "
                         f"directory (init_from= keeps the weights)")


def stream_seed(cfg: TrainConfig, stage_idx: int) -> int:
    """The data stream seed of a stage (its shuffle and shard orders; fixed for a run)."""
    return cfg.seed * 1000 + stage_idx


def param_digests(module: torch.nn.Module, zero3: bool) -> list[str]:
    """sha256 of this rank's full parameters, gathered from every rank (collective): replicas
    that drifted apart (a missed all-reduce, a rank-dependent update) show up as different."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                t = p.detach().float().cpu().contiguous()
        else:
            t = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    digest = h.hexdigest()
    if not torch.distributed.is_initialized():
        return [digest]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, digest)
    return out
