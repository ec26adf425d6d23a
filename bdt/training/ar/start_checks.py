"""The checks a training job makes at start, turning bad input into one clear error before any
step (hours later it would cost the steps since a checkpoint): this machine's threads, the folders
the export copies, the image tokenizer, every stage's shards, and the token budgets."""

from __future__ import annotations

import dataclasses
import os
import tarfile
from typing import NamedTuple

import torch

from bdt import output_dirs
from bdt.data.shard_source import ShardList, list_shards
from bdt.data.token_shards import TokenSample, iter_token_shard
from bdt.model.ar import BitDanceModel
from bdt.model.sequence import patch_side
from bdt.training.ar.config import TrainConfig, stage_p
from bdt.training.ar.run_tokenizer import RunTokenizer, agreeing_tokenizer, configured_tokenizer
from bdt.training.ar.stage_stream import stage_packer


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

