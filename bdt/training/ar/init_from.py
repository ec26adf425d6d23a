"""Starting a run from `init_from` (a model export): the backbone, image tokenizer and architecture
it supplies, checked against the config before anything is built."""

from __future__ import annotations

import logging
import os

from bdt import storage
from bdt.model.ar import LLM_DIR, WEIGHTS_NAME, read_model_config
from bdt.model.keymap import release_layout
from bdt.training.ar.config import TrainConfig
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
