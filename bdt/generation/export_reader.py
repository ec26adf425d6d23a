"""Reading a model export (`<run_dir>/export`, written by the trainer, bdt/training/ar/export.py):
the model (`BitDanceModel.save_pretrained` layout), `image_tokenizer/` and `train_config.yaml`.
Every file is checked present before anything is built, so a half-copied export fails with the
list of what is missing rather than deep inside from_pretrained."""

from __future__ import annotations

import os

import torch

from bdt.generation.run_weights import VOCAB_FILES
from bdt.generation.trained import TrainedModel, load_decoder, runnable_backend, trained_buckets
from bdt.model import llm_config_record
from bdt.model.ar import CONFIG_NAME, LLM_DIR, WEIGHTS_NAME, BitDanceModel, read_model_config
from bdt.model.keymap import release_layout
from bdt.model.text_tokenizer import load_text_tokenizer, query_tokens_held
from bdt.training import run_dir as layout
from bdt.weights import file_present

# llm/tokenizer_config.json: without it the tokenizer loads with other special tokens, and the
# error blamed the weights ("the tokenizer does not belong to these weights").
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{LLM_DIR}/config.json",
                f"{LLM_DIR}/tokenizer_config.json",
                f"{layout.EXPORT_IMAGE_TOKENIZER_DIR}/config.json",
                f"{layout.EXPORT_IMAGE_TOKENIZER_DIR}/model.safetensors")


def load_export(path: str, device: str | torch.device) -> TrainedModel:
    """The export at `path`. Its files are opened one by one, each through `path`: a swap
    between two opens mixes two exports (a model with another's image tokenizer), which
    load_trained detects and loads again."""
    missing = [f for f in EXPORT_FILES if not file_present(os.path.join(path, f))]
    # Any one of them: without, transformers' error of many lines named no file.
    if not any(file_present(os.path.join(path, LLM_DIR, f)) for f in VOCAB_FILES):
        missing.append(f"{LLM_DIR}/{VOCAB_FILES[0]} (or {', '.join(VOCAB_FILES[1:])})")
    release = release_layout(path) if missing else None
    if release is not None:
        raise OSError(f"{path!r} is {release.name}: convert it once with "
                      f"`bdt model import-bitdance --src {path} --out DIR`, then use DIR")
    if missing:
        raise OSError(f"{path!r} is not a complete model export: missing {', '.join(missing)} "
                      f"(expected the <run_dir>/export that bdt/train.py writes)")
    train_cfg = os.path.join(path, layout.EXPORT_TRAIN_CONFIG_NAME)
    tokenizer = load_text_tokenizer(os.path.join(path, LLM_DIR))  # read once, checked, used
    _check_export_parallel_num(path, train_cfg, query_tokens_held(tokenizer))
    llm_config_record.check(path, os.path.join(path, LLM_DIR))
    backend = runnable_backend(read_model_config(path).attn_backend, device)
    model = BitDanceModel.from_pretrained(path, tokenizer=tokenizer, attn_backend=backend
                                          ).to(device).eval()
    decoder = load_decoder(os.path.join(path, layout.EXPORT_IMAGE_TOKENIZER_DIR), model, device)
    buckets = trained_buckets(train_cfg) if os.path.isfile(train_cfg) else None
    return TrainedModel(model, decoder, path, buckets)


def _check_export_parallel_num(path: str, train_cfg: str, held: int) -> None:
    """OSError unless the export's parallel_num (P) is the one it was trained with: an edited
    model_config.yaml sampled garbage without a word (a larger P with query tokens added
    untrained, a smaller one with fewer tokens per step than the head learnt). The training
    config records P; an import (no training config) has the query tokens of its P exactly.
    `held`: the P of the query tokens the export's text tokenizer holds."""
    p = read_model_config(path).parallel_num
    source = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(train_cfg):
        trained = layout.read_config(train_cfg).get("model", {}).get("parallel_num")
        if trained is not None and int(trained) != p:
            raise OSError(f"{source}: parallel_num is {p}, but the model was trained with "
                          f"{trained} ({train_cfg}): restore parallel_num: {trained}")
    if held < p or (held != p and not os.path.isfile(train_cfg)):
        raise OSError(f"{source}: parallel_num is {p}, but the model's text tokenizer holds the "
                      f"query tokens of P = {held}: restore parallel_num: {held}")
