"""The LLM config a model was saved with, kept beside the export's `llm/config.json`.

Fields of that file that change no weight shape (a sliding window, the layer types, RoPE's
parameters, the norm epsilon) still change what the model computes. Edited after training, the
export loaded and sampled a different model without a word; with this record, loading names the
edited fields instead. Only fields that cannot change the computation may differ.
"""

from __future__ import annotations

import json
import os

from bdt import storage

RECORD_NAME = "llm_config_as_saved.json"
# Read by nothing that runs in eval mode on weights already loaded: dtype is a loading choice.
UNCHECKED = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
                       "initializer_range", "attention_dropout", "_name_or_path",
                       "output_attentions", "output_hidden_states", "return_dict"})
_MISSING = object()  # a field one of the two files lacks


def record(model_dir: str, llm_dir: str) -> None:
    """Copy `llm_dir/config.json`, as just saved, to the record in local `model_dir`."""
    with open(os.path.join(llm_dir, "config.json"), "rb") as f:
        storage.write_bytes_atomic(os.path.join(model_dir, RECORD_NAME), f.read())


def check(model_dir: str, llm_dir: str) -> None:
    """OSError naming every field of `llm_dir/config.json` that differs from the record (none
    for a folder saved without one: written before the record existed, or by an import)."""
    recorded = os.path.join(model_dir, RECORD_NAME)
    if not os.path.isfile(recorded):
        return
    current = os.path.join(llm_dir, "config.json")
    saved, now = _read(recorded), _read(current)
    changed = [f"{key} is {_show(now, key)}, saved as {_show(saved, key)}"
               for key in sorted((saved.keys() | now.keys()) - UNCHECKED)
               if saved.get(key, _MISSING) != now.get(key, _MISSING)]
    if changed:
        raise OSError(f"{current}: {'; '.join(changed)}. The model was trained with the config "
                      f"recorded in {recorded}: restore these fields (to sample with a changed "
                      f"backbone config on purpose, make the record the same)")



def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise OSError(f"{path}: holds no JSON object")
    return data


def _show(config: dict, key: str) -> str:
    return json.dumps(config[key]) if key in config else "absent"
