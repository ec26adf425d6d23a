"""The AR training job's configuration tree (`deepspeed bdt/train.py --config X.yaml k=v`).

    model:       ModelConfig (backbone, head, P, loss weights, activation checkpointing)
    data:        image-tokenizer directory (identity check against shard manifests), buffer,
                 prefetch depth and worker
    stages:      progressive stages run as ONE job (method §5, system §2: 256 -> 512 -> 1024); each has its
                 shards, length (steps, or real tokens), LR schedule, micro-batch token budget
                 and P
    optim:       AdamW (0.9, 0.95), weight decay, gradient clipping (the LR is per stage)
    deepspeed:   ZeRO stage, precision, gradient accumulation; `micro_batch_size` is ignored:
                 a micro-batch is one packed row sized by the stage's token_budget
    checkpoint:  local dir or s3://, every N steps, keep last N (auto-resume from the newest)
    logging:     every N steps to the log + JSONL + TensorBoard, MFU peak, sample-grid cadence
    eval:        every K steps: generate + judge a subset of the shapes suite, scores logged
    fault:       crash injection for recovery tests; leave at 0 in real runs
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from bdt.model.config import ModelConfig
from bdt.storage import is_remote
from bdt.training.config import CheckpointConfig, LoggingConfig, check_run_dir
from bdt.training.deepspeed_config import DeepSpeedConfig, OptimConfig
from bdt.training.schedule import SCHEDULES

log = logging.getLogger(__name__)

@dataclass
class StageConfig:
    name: str = "???"
    shards: str = "???"  # token-shard dir, glob, .tar, or an extraction output (index.json)
    family: str = ""  # family inside an extraction manifest ("" = its only one; needs one)
    # Train on an extraction whose index.json says complete: false (only its complete shards are
    # listed); off, such a manifest is refused so that a partial dataset is never used by accident.
    allow_incomplete: bool = False
    steps: int = 0  # optimizer steps of this stage; or:
    tokens: int = 0  # real tokens (all ranks, no padding): the stage ends once it has seen them
    token_budget: int = 4096  # packed tokens per micro-batch per rank (whole samples only)
    # P trained in this stage; 0 = model.parallel_num. A smaller P may come first (method §4: a
    # P = 64 model starts from P = 16 training): see `validate`.
    parallel_num: int = 0
    # LR schedule of the stage: linear warmup, then constant or cosine down to min_lr_ratio * lr
    # at the stage's end (method §5: AdamW, warmup then constant lr late in training).
    lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # constant | cosine
    min_lr_ratio: float = 0.1


@dataclass
class DataConfig:
    # Image tokenizer directory whose codes the shards hold: checked against each manifest's
    # tokenizer sha256 and copied into the export. "" = no identity check.
    tokenizer: str = ""
    # Convenience for YAMLs: stages may say `shards: ${data.root}`, so one command-line override
    # (data.root=s3://...) moves every stage (stages.N.shards=... moves stage N alone).
    root: str = ""
    buffer_size: int = 256  # shuffle/packing buffer per rank, in samples
    # Micro-batches (packed rows) a background worker builds ahead of the step, so the step
    # does not wait for reading and packing (bdt/data/prefetch.py; checkpoints still hold the
    # stream state after the last row the step TOOK). 0 = build each row when the step asks.
    # 4 rows (~3 MB each at a 16k budget) ride out a slow shard open or a descheduled worker.
    prefetch: int = 4
    # The worker: "process" (a spawned process per rank: shares no GIL with the training loop,
    # costs a process start per stage), "thread", or "auto" = process on CUDA, thread on CPU.
    prefetch_worker: str = "auto"
    # A worker that builds no row for this long stops the run, naming the shard it reads (a
    # read that never returns: a hung NFS mount, an endpoint that stopped answering) instead
    # of the other ranks timing out in a collective; the resume wrapper then restarts it.
    # 0 = wait forever. It holds with prefetch 0 too (the row is then built in a thread of its
    # own, which the step waits for).
    stall_s: float = 600.0


@dataclass
class ARLoggingConfig(LoggingConfig):
    peak_tflops: float = 0.0  # per rank, for MFU; 0 = measure a matmul at start (same run)
    # In-loop sample grid PNG every K steps (0 = off); needs data.tokenizer to decode the bits.
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "two blue squares"])
    sample_hw: list[int] = field(default_factory=lambda: [16, 16])  # latent tokens (h, w)
    sample_steps: int = 25  # head sampler steps per AR step
    # Debug: every consumed sample key per rank and step to <run_dir>/sample_keys/ (checks that
    # restarts, also on another number of ranks, neither repeat nor skip data).
    sample_keys: bool = False


@dataclass
class EvalConfig:
    """In-loop evaluation (bdt/eval/in_loop.py): the shapes suite generated and judged."""

    every: int = 0  # steps between evaluations; 0 = off (needs data.tokenizer to decode)
    per_category: int = 2  # suite prompts per category (0 = all 40)
    categories: list[str] = field(default_factory=list)  # [] = every category
    width: int = 128  # px
    height: int = 128
    steps: int = 25  # head sampler steps per AR step
    cfg_scale: float = 7.5
    batch: int = 8


@dataclass
class CompileConfig:
    """torch.compile of each decoder layer and the diffusion head for the training steps
    (BitDanceModel.compile_blocks): fuses the norms, RoPE, activations and adaLN modulation
    between the matmuls. Off by default: never run on a GPU yet (GPU_CHECK_COMPILE=1
    scripts/gpu_check.sh measures it), and no faster for the 2-rank CPU demo (docs/results.md).
    Previews, in-loop evaluation and the export run eager. Not with ZeRO-3, whose parameter
    gathers hook into every module call."""

    enabled: bool = False
    backend: str = "inductor"  # any torch._dynamo backend; "aot_eager" traces without codegen


@dataclass
class FaultConfig:
    """Crash injection (tests of recovery). A real SIGKILL/SIGTERM of this process at a step."""

    kill_after_checkpoint: int = 0  # SIGKILL right after the complete checkpoint of this step
    kill_during_checkpoint: int = 0  # SIGKILL after the engine files, before the marker
    sigterm_at_step: int = 0  # rank 0 sends itself SIGTERM after this step


@dataclass
class TrainConfig:
    run_dir: str = "???"  # metrics, TensorBoard, resolved config, export (local)
    seed: int = 0
    threads: int = 0  # torch intra-op threads per rank; 0 = leave torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # AdamW betas/eps/weight decay and gradient clipping; lr/warmup/schedule here are unused
    # (each stage has its own).
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: ARLoggingConfig = field(default_factory=ARLoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # in-loop shapes-suite evaluation
    compile: CompileConfig = field(default_factory=CompileConfig)
    export: bool = True  # write <run_dir>/export (model + tokenizer files) at the end
    # > 0: keep an exponential moving average of the weights (fp32, on every rank, in each
    # checkpoint); previews, in-loop evaluation and the export then use the averaged weights.
    # Needs whole parameters on each rank (ZeRO 0-2).
    ema_decay: float = 0.0
    # > 0: after this many minutes of training in this process, finish as if the last stage
    # had ended (save, export, exit 0): a wall-clock cap, e.g. for the CPU demo's 30-minute
    # budget. Running the same command again resumes from that checkpoint with a fresh budget.
    time_limit_min: float = 0.0
    # In (0, 1] with time_limit_min: once the last stage has run 60 steps in this process, shorten
    # it so that its schedule (cosine decay included) ends after this fraction of the time left
    # at the measured step rate, instead of the limit cutting it mid-decay (time_fit.py). Never
    # lengthens a stage; the decision is kept in checkpoints. 0 = off.
    time_limit_fit: float = 0.0
    # A model export whose weights start the run (fine-tuning): an earlier run's export/ or what
    # `bdt model import-bitdance` wrote from a released BitDance model. Its llm/ is the backbone
    # (leave model.backbone.path empty), its connector and head are loaded (its model.head,
    # parallel_num and pos_max_len replace the config's), and data.tokenizer defaults to its
    # image_tokenizer/. Optimizer state starts fresh; a resume loads its checkpoint as always.
    init_from: str = ""
    fault: FaultConfig = field(default_factory=FaultConfig)


def _check_compile(cfg: TrainConfig) -> None:
    import torch

    if cfg.deepspeed.zero_stage == 3:
        raise ValueError("compile.enabled needs deepspeed.zero_stage 0-2: ZeRO-3 gathers "
                         "parameters in hooks around every module call, which the compiled "
                         "layers would have to trace through (not supported here)")
    known = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile.backend not in known:
        raise ValueError(f"compile.backend: unknown torch.compile backend "
                         f"{cfg.compile.backend!r}; known here: {', '.join(sorted(known))}")


def stage_p(cfg: TrainConfig, i: int) -> int:
    return cfg.stages[i].parallel_num or cfg.model.parallel_num


def _check_stage_p(cfg: TrainConfig, i: int) -> None:
    """A stage's P works with the model's parameters as they are: the head denoises any number
    of tokens, the block-causal layout takes any block size, and the query tokens of a smaller
    P are a prefix of the model's (<|query_j|> has the same id whatever P). A larger P would
    need query-token embeddings the model does not have, and the exported model samples at
    model.parallel_num, so the last stage must train that one."""
    from bdt.model.sequence import patch_side

    where, p, model_p = f"stages[{i}] ({cfg.stages[i].name}).parallel_num", stage_p(cfg, i), \
        cfg.model.parallel_num
    try:
        if p < 1:  # patch_side's isqrt would name only itself
            raise ValueError(f"parallel_num (P) must be a perfect square >= 1 (0 = "
                             f"model.parallel_num), got {cfg.stages[i].parallel_num}")
        patch_side(p)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if p > model_p:
        # init_from's model fixes P (init_from.resolve_init_from): model.parallel_num is replaced.
        fix = (f"init_from={cfg.init_from} is a P = {model_p} model: lower the stage's P"
               if cfg.init_from else "set model.parallel_num to the largest P of the run")
        raise ValueError(f"{where} = {p} exceeds model.parallel_num = {model_p}: the model has "
                         f"query tokens for P <= {model_p} only; {fix}")
    if i == len(cfg.stages) - 1 and p != model_p:
        raise ValueError(f"{where} = {p}: the last stage must train model.parallel_num = "
                         f"{model_p}, the P the exported model samples with")


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first bad key (shards are checked when the job starts)."""
    cfg.model.validate()
    if not cfg.model.backbone.path:
        raise ValueError("model.backbone.path: name the LLM (a Hugging Face directory or hub id), "
                         "or start from a model export with init_from")
    if is_remote(cfg.model.backbone.path):  # from_pretrained reads local folders and hub ids
        raise ValueError(f"model.backbone.path {cfg.model.backbone.path!r} (init_from's llm/ when "
                         f"set) must be a local directory or a hub id: copy the model to a local "
                         f"or shared filesystem")
    if not cfg.stages:
        raise ValueError("stages: the config lists no training stage")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages: names must be unique, got {names}")
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}] ({s.name})"
        if s.steps < 0 or s.tokens < 0 or (s.steps > 0) == (s.tokens > 0):
            raise ValueError(f"{where}: set exactly one of steps and tokens (got steps={s.steps}, "
                             f"tokens={s.tokens})")
        if s.token_budget < 1:
            raise ValueError(f"{where}.token_budget must be >= 1, got {s.token_budget}")
        if not s.shards:
            raise ValueError(f"{where}.shards is empty: set data.root=... (stages that say "
                             f"shards: ${{data.root}} read it) or the stage's shards")
        _check_stage_p(cfg, i)
        if 0 < s.steps <= s.warmup_steps:  # legal (short test runs do it), rarely meant
            log.warning("%s: warmup_steps %d >= steps %d: the LR ramps up for the whole stage "
                        "and never reaches lr", where, s.warmup_steps, s.steps)
    if cfg.logging.sample_every > 0 and not (cfg.data.tokenizer and cfg.logging.sample_prompts):
        raise ValueError("logging.sample_every needs data.tokenizer (to decode the bits) and "
                         "logging.sample_prompts")
    if cfg.logging.sample_every > 0:  # previews sample at model.parallel_num
        from bdt.model.sequence import check_grid, patch_side

        if len(cfg.logging.sample_hw) != 2:
            raise ValueError(f"logging.sample_hw must be [h, w] latent tokens, got "
                             f"{list(cfg.logging.sample_hw)}")
        check_grid(*cfg.logging.sample_hw, patch_side(cfg.model.parallel_num), "logging.sample_hw")
        if max(cfg.logging.sample_hw) > cfg.model.pos_max_len:
            raise ValueError(f"logging.sample_hw {list(cfg.logging.sample_hw)} exceeds the 2D "
                             f"position table: model.pos_max_len = {cfg.model.pos_max_len} "
                             f"tokens per side")
    if cfg.eval.every > 0:
        from bdt.data.shapes import CATEGORIES

        if not cfg.data.tokenizer:
            raise ValueError("eval.every needs data.tokenizer (to decode the generated bits)")
        unknown = [c for c in cfg.eval.categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"eval.categories: unknown {unknown} (known: {list(CATEGORIES)})")
        if cfg.eval.per_category < 0:
            raise ValueError(f"eval.per_category must be >= 0 (0 = all), got "
                             f"{cfg.eval.per_category}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {cfg.ema_decay}")
    if cfg.ema_decay > 0 and cfg.deepspeed.zero_stage == 3:
        raise ValueError("ema_decay needs whole parameters on each rank: use deepspeed.zero_stage "
                         "0-2, or ema_decay=0 with ZeRO-3")
    if cfg.compile.enabled:
        _check_compile(cfg)
    if cfg.data.prefetch_worker not in ("auto", "thread", "process"):
        raise ValueError(f"data.prefetch_worker must be one of auto, thread, process; got "
                         f"{cfg.data.prefetch_worker!r}")
    if not cfg.time_limit_min >= 0:  # also refuses NaN
        raise ValueError(f"time_limit_min must be >= 0 (0 = no limit), got {cfg.time_limit_min}")
    if not 0 <= cfg.time_limit_fit <= 1 or (cfg.time_limit_fit > 0 and cfg.time_limit_min == 0):
        raise ValueError(f"time_limit_fit must be in [0, 1] (0 = off) and needs time_limit_min > 0; "
                         f"got {cfg.time_limit_fit} with time_limit_min={cfg.time_limit_min}")
    check_run_dir(cfg.run_dir)
    cfg.checkpoint.validate()
    cfg.logging.validate()
    cfg.optim.validate(with_schedule=False)  # each stage has its own LR schedule
    _refuse_optim_schedule(cfg.optim)
    cfg.deepspeed.validate(with_micro_batch=False)  # a micro-batch is one packed row
    for key, value, ok, expected in _value_rules(cfg):
        if not ok:
            raise ValueError(f"{key} must be {expected}, got {value!r}")


def _refuse_optim_schedule(optim: OptimConfig) -> None:
    """The LR schedule is each stage's: an `optim.lr=...` override was otherwise taken and ignored."""
    default = OptimConfig()
    for key in ("lr", "warmup_steps", "schedule", "min_lr_ratio"):
        if getattr(optim, key) != getattr(default, key):
            raise ValueError(f"optim.{key}: the AR trainer takes its LR schedule from each stage; "
                             f"set stages.N.{key} instead (got optim.{key}={getattr(optim, key)!r})")


def _value_rules(cfg: TrainConfig) -> list[tuple[str, object, bool, str]]:
    """(key, value, within its range, the range) for values that would fail deep inside torch or
    the sampler, or train silently wrong (a negative LR at a schedule's end). NaN fails every
    comparison, so it is refused too."""
    e, logs = cfg.eval, cfg.logging
    rules = [("seed", cfg.seed, 0 <= cfg.seed < 2**63, "in [0, 2^63)"),
             ("threads", cfg.threads, cfg.threads >= 0, ">= 0 (0 = torch's default)"),
             # Upper limits: the stream is endless, so a worker asked for 1e9 rows ahead, or a
             # buffer of 1e12 samples, read on until the rank ran out of memory.
             ("data.buffer_size", cfg.data.buffer_size, 1 <= cfg.data.buffer_size <= 2**20,
              "in [1, 1048576] samples"),
             ("data.prefetch", cfg.data.prefetch, 0 <= cfg.data.prefetch <= 256,
              "in [0, 256] rows (0 = off)"),
             # 1e6: the waits' timeouts overflow from ~2.1e6 s (a poll's int milliseconds).
             ("data.stall_s", cfg.data.stall_s, 0 <= cfg.data.stall_s <= 1e6,
              "a finite number of seconds >= 0 (0 = no limit) and at most 1e6"),
             ("eval.every", e.every, e.every >= 0, ">= 0 (0 = off)"),
             ("logging.sample_every", logs.sample_every, logs.sample_every >= 0, ">= 0 (0 = off)"),
             ("logging.sample_steps", logs.sample_steps, logs.sample_steps >= 1, ">= 1"),
             ("logging.peak_tflops", logs.peak_tflops, 0 <= logs.peak_tflops < math.inf,
              "a finite number >= 0 (0 = measure)")]
    rules += [(f"fault.{k}", getattr(cfg.fault, k), getattr(cfg.fault, k) >= 0, ">= 0 (0 = off)")
              for k in ("kill_after_checkpoint", "kill_during_checkpoint", "sigterm_at_step")]
    if e.every > 0:
        rules += [(f"eval.{k}", getattr(e, k), getattr(e, k) >= 1, ">= 1")
                  for k in ("width", "height", "steps", "batch")]
        rules.append(("eval.cfg_scale", e.cfg_scale, 0 <= e.cfg_scale < math.inf,
                      "a finite number >= 0"))
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}] ({s.name})"
        rules += [(f"{where}.lr", s.lr, 0 <= s.lr < math.inf, ">= 0"),
                  (f"{where}.min_lr_ratio", s.min_lr_ratio, 0 <= s.min_lr_ratio <= 1, "in [0, 1]"),
                  (f"{where}.warmup_steps", s.warmup_steps, s.warmup_steps >= 0, ">= 0"),
                  (f"{where}.schedule", s.schedule, s.schedule in SCHEDULES,
                   f"one of {list(SCHEDULES)}")]
    return rules
