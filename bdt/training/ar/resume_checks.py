"""What a checkpoint's records decide about resuming it under this start's config, checked before
the engine loads its weights (CheckpointLoader's `before_load`): a refused resume reads no
tensors, which at 1B parameters took minutes per checkpoint, and writes nothing."""

from __future__ import annotations

from bdt.data.shard_source import ShardList
from bdt.training.ar.config import TrainConfig
from bdt.training.ar.run_tokenizer import RunTokenizer, check_resumed
from bdt.training.ar.stage_stream import check_stream_state
from bdt.training.ar.stages import StageClock
from bdt.training.checkpoint_load import SHARED_FILE, BeforeLoad
from bdt.training.distributed import DistInfo


def resume_checks(cfg: TrainConfig, sources: list[ShardList], tokenizer: RunTokenizer | None,
                  dist: DistInfo) -> BeforeLoad:
    """The checks of a checkpoint (its path, rank 0's state, its marker), each a ValueError
    naming the key: the state's are every rank's alike (rank 0's stream stands for all: a
    fingerprint of the whole shard list and seed)."""

    def check(where: str, state: dict, marker: dict) -> None:
        if "clock" not in state:
            raise ValueError(f"checkpoint {where} has no stage clock (written before stages "
                             f"could end on real tokens): start a new checkpoint.dir")
        clock = StageClock(cfg.stages, cfg.deepspeed.grad_accum, dist.world_size)
        clock.load_state_dict(state["clock"])  # stages renamed or removed: refused by name
        clock.resume_at(int(state["step"]))
        # Refused at a stage switch too: every stage's stream is seeded from it, so a new seed
        # there made another run than the one resumed, and whether it was taken depended on
        # where a preemption fell. (Named: the stream's check cannot tell.)
        if state.get("seed", cfg.seed) != cfg.seed:
            raise ValueError(f"seed = {cfg.seed}, but the run's data streams are shuffled with "
                             f"seed = {state['seed']} (checkpoint {where}): resume with "
                             f"seed={state['seed']}, or start a new run directory")
        check_resumed(tokenizer, state, where, quiet=not dist.is_main)
        if cfg.ema_decay > 0 and SHARED_FILE not in marker.get("files", {}):
            raise ValueError(f"checkpoint {where} holds no EMA weights but "
                             f"ema_decay={cfg.ema_decay}: resume with ema_decay=0")
        if clock.stage == state["stage"]:  # the stream resumes (else its stage is over)
            check_stream_state(cfg, clock.stage, sources[clock.stage], state["stream"], 0,
                               int(marker.get("world_size", dist.world_size)))

    return check

