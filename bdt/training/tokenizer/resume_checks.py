"""What a tokenizer checkpoint's records decide about resuming it under this start's config,
checked before the engine loads its weights (CheckpointLoader's `before_load`), as the AR
trainer's are (bdt/training/ar/resume_checks.py): a refused resume reads no tensors and writes
nothing. The marker's settings (ZeRO stage, precision, shard list, data seed, image decoding) are
checked by CheckpointManager (loop.training_checkpoints); the data stream here, from rank 0's
saved state."""

from __future__ import annotations

from bdt.data.raw import make_loader
from bdt.training.checkpoint_load import BeforeLoad
from bdt.training.tokenizer.config import TokenizerTrainConfig


def resume_checks(cfg: TokenizerTrainConfig) -> BeforeLoad:
    """The checks of a checkpoint (its path, rank 0's state, its marker), each a ValueError
    naming the key: its stream's split into data workers (data.num_workers) and the shard list
    its positions index (which a marker from before data.shards was recorded does not name).
    Rank 0's stream stands for every rank's: all are split and indexed alike."""

    def check(where: str, state: dict, marker: dict) -> None:
        try:
            # The loader the run would build over that stream, never iterated: nothing is read.
            make_loader(cfg.data, cfg.deepspeed.micro_batch_size, 0, 1, state.get("stream"))
        except ValueError as e:
            raise ValueError(f"checkpoint {where}: {e}") from None

    return check
