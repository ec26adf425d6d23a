"""Reading weight files and checking them against a module, for every loader of bdt's and
BitDance's files (tokenizer, connector + head): one clear error naming the file and the keys.

Only safetensors (and, in bdt.tokenizer.io, weights-only torch files) are read: never a pickle.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load, load_file

from bdt import storage

_MAX_LISTED = 6


def read_safetensors(url: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (local or fsspec URL); `mmap`: memory-map a local file
    (for a caller that copies the tensors anyway). ValueError naming `url` for a file that is not
    one: safetensors checks the header's dtypes, shapes and offsets against the file's size."""
    try:
        if mmap and not storage.is_remote(url):
            return load_file(url)
        return load(storage.read_bytes(url))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for bad headers
        raise ValueError(f"{url}: not a readable safetensors file ({e})") from None


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def state_dict_problems(expected: Mapping[str, torch.Tensor],
                        state: Mapping[str, torch.Tensor]) -> list[str]:
    """Why `state` cannot replace a module's state dict `expected` (empty: it can): missing and
    unexpected keys, shape mismatches, integer tensors for float parameters, NaN or inf values
    (a model loaded from them would compute garbage). Meta tensors are checked for shape only."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    common = [k for k in expected if k in state]
    shapes = [f"{k}: expected {list(expected[k].shape)} got {list(state[k].shape)}"
              for k in common if expected[k].shape != state[k].shape]
    dtypes = [f"{k}: {state[k].dtype}" for k in common
              if expected[k].is_floating_point() and not state[k].is_floating_point()]
    nonfinite = [k for k in common if state[k].is_floating_point() and not state[k].is_meta
                 and not bool(torch.isfinite(state[k]).all())]
    parts = [f"{len(items)} {what} {listing(items)}" for what, items in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected),
        ("shape mismatch(es)", shapes), ("non-float tensor(s) for float parameters", dtypes),
        ("tensor(s) with NaN or inf values", nonfinite)) if items]
    prefix = _shared_prefix(missing, unexpected)
    if prefix:
        parts.append(f"every key carries an extra prefix {prefix!r} (strip it from the file)")
    return parts


def _shared_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """The prefix (e.g. 'module.' of a DDP wrapper) that, stripped from every unexpected key,
    gives exactly the missing keys; None if there is none."""
    if not missing or len(missing) != len(unexpected):
        return None
    first = unexpected[0]
    prefix = next((first[:-len(k)] for k in missing if first.endswith("." + k)), None)
    if prefix is None or any(not k.startswith(prefix) for k in unexpected):
        return None
    return prefix if {k[len(prefix):] for k in unexpected} == set(missing) else None
