"""A stage's data stream: its seed, its packer, the recipe of its rows, and whether a checkpoint's
stream state continues it."""

from __future__ import annotations

import dataclasses

from bdt.data.shard_source import ShardList
from bdt.data.stream_state import same_stream
from bdt.data.token_stream import TokenStream
from bdt.model.ar import BitDanceModel
from bdt.model.sequence import SequencePacker
from bdt.training.distributed import DistInfo
from bdt.training.ar.stage_rows import CaptionMeasure, StageRows
from bdt.training.ar.config import TrainConfig, stage_p


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
                       rank: int, world_size: int) -> None:
    """A checkpoint's stream continues only over the shards and seed it read (the stream checks
    it too, but later and without naming the stage): `stream_meta` is `rank`'s of `world_size`
    as saved; checked at the resume, before the checkpoint loads (resume_checks.py)."""
    seed = stream_seed(cfg, stage_idx)
    if not same_stream(stream_meta, shards.urls, rank, world_size, seed):
        stage = cfg.stages[stage_idx]
        raise ValueError(f"stages.{stage_idx} ({stage.name!r}): the checkpoint's data stream was "
                         f"read from other shards than the {len(shards.urls)} that its shards "
                         f"{stage.shards!r} name now, or with another seed: resume with the "
                         f"stage's shards and the run's seed as they were, or start a new run "
                         f"directory (init_from= keeps the weights)")


def stream_seed(cfg: TrainConfig, stage_idx: int) -> int:
    """The data stream seed of a stage (its shuffle and shard orders; fixed for a run)."""
    return cfg.seed * 1000 + stage_idx

