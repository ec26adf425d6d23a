"""Building a training job's parts, with the start-up checks that turn bad input into one clear
error: shard sources, image-tokenizer identity, bits per token, model shape vs. checkpoints."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import torch

from bdt import storage
from bdt.data.shard_source import ShardList, iter_shard, list_shards, tokenizer_sha
from bdt.data.token_shards import TokenSample, decode_sample
from bdt.data.token_stream import MicroBatch, TokenStream
from bdt.model.ar import BitDanceModel
from bdt.model.sequence import ImageSample, SequencePacker
from bdt.model.text_tokenizer import encode
from bdt.tokenizer.bits import to_pm1, unpack_bits
from bdt.trainer.distributed import DistInfo, barrier
from bdt.trainer.train_config import TrainConfig

SIGNATURE_NAME = "model_shapes.json"


def check_data(cfg: TrainConfig) -> list[ShardList]:
    """Every stage's shard list; ValueError on a missing source, shards written by another image
    tokenizer than `data.tokenizer` (or than another stage's), or bits per token != the model's."""
    from bdt.extract.manifest import tokenizer_identity

    want = tokenizer_identity(cfg.data.tokenizer)["sha256"] if cfg.data.tokenizer else None
    want_from = cfg.data.tokenizer
    out = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}] ({stage.name})"
        try:
            shards = list_shards(stage.shards, stage.family, stage.allow_incomplete)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        sha = tokenizer_sha(shards.manifest)
        if sha is not None:
            if want is None:
                want, want_from = sha, f"the manifest of {stage.shards}"
            elif sha != want:
                diff = sorted(k for k in set(sha) | set(want) if sha.get(k) != want.get(k))
                raise ValueError(f"{where}: the shards in {stage.shards} were written by a different "
                                 f"image tokenizer than {want_from} (files differing: {diff[:3]}); "
                                 f"re-extract them or point data.tokenizer at the right tokenizer")
        first = _first_sample(shards.urls[0])
        if first is not None and first.bits_per_token != cfg.model.head.bits:
            raise ValueError(f"{where}: {shards.urls[0]} holds {first.bits_per_token}-bit tokens, "
                             f"model.head.bits is {cfg.model.head.bits}")
        out.append(shards)
    return out


def _first_sample(url: str) -> TokenSample | None:
    try:
        raw, _, _ = next(iter_shard(url))
        return decode_sample(raw)
    except (StopIteration, ValueError, OSError):
        return None  # an empty or damaged first shard is the stream's business (skip and count)


def skip_deepspeed_muon() -> None:
    """DeepSpeed's ZeRO code imports its Muon optimizer module (to recognise that optimizer), and
    that module torch.compiles kernels at import: ~3 s of CPU per rank per start, measured here,
    for an optimizer we never build. A stand-in module whose class nothing is an instance of keeps
    every `from ... import MuonWithAuxAdam` + isinstance check working."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stub = types.ModuleType(name, "stand-in: bdt never uses DeepSpeed's Muon optimizer")
        stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stub


def build_model(cfg: TrainConfig) -> BitDanceModel:
    """The model, built whole on every rank; `deepspeed.initialize` partitions it under ZeRO-3.

    Partitioning at load (a live HfDeepSpeedConfig while the LLM is built, ENVIRONMENT.md) is
    not used yet: `bdt.model.backbone.resize_embeddings` reads the embedding's row count from
    `weight.shape`, which is 0 for a ZeRO-3 partitioned parameter, and fills every row with NaN.
    """
    return BitDanceModel.from_config(cfg.model)


def numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """name -> full shape (ZeRO-3 partitioned parameters report theirs in ds_shape)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def check_model_signature(root: str, signature: dict[str, list[int]], dist: DistInfo) -> None:
    """First start: record the model's parameter shapes beside the checkpoints. Later starts:
    refuse checkpoints of a differently shaped model before DeepSpeed tries to load them."""
    url = storage.join(root, SIGNATURE_NAME)
    if storage.exists(url):
        saved = json.loads(storage.read_bytes(url))
        for name in list(signature) + [n for n in saved if n not in signature]:
            if saved.get(name) != signature.get(name):
                raise ValueError(f"checkpoints in {root} are from a different model shape: parameter "
                                 f"'{name}' is {saved.get(name)} there and {signature.get(name)} in "
                                 f"this config; use a new checkpoint.dir or the original model config")
    elif dist.is_main:
        storage.makedirs(root)
        storage.write_bytes_atomic(url, json.dumps(signature).encode())
    barrier()


def make_stream(cfg: TrainConfig, stage_idx: int, shards: ShardList, model: BitDanceModel,
                dist: DistInfo) -> tuple[TokenStream, SequencePacker]:
    """The stage's data stream and packer (captions encoded once, when the stream measures)."""
    stage = cfg.stages[stage_idx]
    tok = model.tokenizer
    packer = SequencePacker(model.special, model.prompt, cfg.model.parallel_num,
                            max_len=stage.token_budget, caption_dropout=cfg.model.caption_dropout)

    def measure(sample: TokenSample) -> int:
        # Always this model's tokenizer: ids stored in a shard may come from another tokenizer
        # or carry its BOS (extraction's caption_tokenizer is independent of the model).
        sample.caption_ids = np.asarray(encode(tok, sample.caption), dtype=np.int32)
        h, w = sample.grid
        return packer.sample_len(len(packer.prompt_ids(sample.caption_ids.tolist())), h, w)

    stream = TokenStream(shards.urls, dist.rank, dist.world_size, stage.token_budget, measure,
                         buffer_size=cfg.data.buffer_size, seed=stream_seed(cfg, stage_idx),
                         bits_per_token=cfg.model.head.bits)
    return stream, packer


def stream_seed(cfg: TrainConfig, stage_idx: int) -> int:
    """The data stream seed of a stage (its shuffle and shard orders; fixed for a run)."""
    return cfg.seed * 1000 + stage_idx


def image_samples(batch: MicroBatch, bits: int) -> list[ImageSample]:
    """Token samples -> packer inputs: caption ids and the +-1 bit grid [h, w, C]."""
    return [ImageSample(caption=s.caption_ids.tolist(),
                        bits_HWC=to_pm1(torch.from_numpy(unpack_bits(s.bits_hwB, bits))))
            for s in batch.samples]



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
