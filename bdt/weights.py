"""Reading weight files and checking them against a module, for every loader of bdt's and
BitDance's files (tokenizer, connector + head): one clear error naming the file and the keys.

A safetensors file may also be sharded as Hugging Face tools write large ones:
`<name>.safetensors.index.json` ({"metadata": ..., "weight_map": {key: shard file}}) beside
`<name>-00001-of-0000N.safetensors`, ...; `read_safetensors(<name>.safetensors)` reads either.
Only safetensors (and, in bdt.tokenizer.io, weights-only torch files) are read: never a pickle.
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from collections.abc import Mapping

import torch
from safetensors.torch import load, load_file

from bdt import storage, url_listing

_MAX_LISTED = 6
INDEX_SUFFIX = ".index.json"  # <name>.safetensors.index.json: the shards of <name>.safetensors


def locate_safetensors(url: str) -> str | None:
    """`url` if that file exists, else its shard index `<url>.index.json` if that exists (the
    unsharded file wins, as in transformers), else None."""
    for candidate in (url, url + INDEX_SUFFIX):
        if storage.exists(candidate):
            return candidate
    return None


def file_present(url: str) -> bool:
    """A file exists; a `.safetensors` one whole or as its shard index."""
    if url.endswith(".safetensors"):
        return locate_safetensors(url) is not None
    fs, path = storage.filesystem(url)
    return fs.isfile(path)


def safetensors_files(url: str) -> list[str]:
    """The files that make up the weights `url` names: the file itself, or its index and the
    shards the index lists; FileNotFoundError when neither exists."""
    found = locate_safetensors(url)
    if found is None:
        raise FileNotFoundError(f"{url}: no such file, nor a shard index {url + INDEX_SUFFIX}")
    if not found.endswith(INDEX_SUFFIX):
        return [found]
    folder = posixpath.dirname(found)
    return [found, *(storage.join(folder, s) if folder else s for s in _shard_index(found))]


def read_safetensors(url: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (local or fsspec URL), or of its shards when only
    `<url>.index.json` exists (`url` may also name the index itself); `mmap`: memory-map local
    files (for a caller that copies the tensors anyway). ValueError naming the file that is not
    one: safetensors checks the header's dtypes, shapes and offsets against the file's size."""
    if url.endswith(INDEX_SUFFIX):
        return _read_shards(url, mmap)
    try:
        return _read_file(url, mmap)
    except FileNotFoundError:
        if not storage.exists(url + INDEX_SUFFIX):
            raise
    return _read_shards(url + INDEX_SUFFIX, mmap)


def _read_file(url: str, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        if mmap and not storage.is_remote(url):
            return load_file(url)
        return load(storage.read_bytes(url))
    except FileNotFoundError:
        raise
    except OSError as e:
        if storage.is_remote(url):  # the network or the store, not the file: not damage
            raise type(e)(f"{url}: cannot be read ({e})") from e
        raise ValueError(f"{url}: not a readable safetensors file ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for bad headers
        raise ValueError(f"{url}: not a readable safetensors file ({e})") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is listed twice ({seen[key]!r} and {value!r})")
        seen[key] = value
    return seen


def _shard_index(index_url: str) -> dict[str, list[str]]:
    """shard file name -> the keys the index at `index_url` puts in it (index order); ValueError
    naming the index when it is not one, or names a shard outside its own folder."""
    try:
        data = json.loads(storage.read_bytes(index_url), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or nested past the parser
        raise ValueError(f"{index_url}: not a valid shard index ({str(e)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_url}: not a shard index: expected a JSON object whose "
                         f"\"weight_map\" maps every tensor name to its shard file")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    # A shard is a file beside its index: never a path that could reach elsewhere.
    outside = [s for s in shards if s in ("", ".", "..") or "/" in s or "\\" in s
               or posixpath.isabs(s)]
    if outside:
        raise ValueError(f"{index_url}: shard name(s) {listing(outside)} refused: a shard must be "
                         f"a plain file name in the index's folder (no path, no '..')")
    # Shards are read as safetensors, never followed as indexes: no index can list itself.
    nested = [s for s in shards if s.endswith(INDEX_SUFFIX)]
    if nested:
        raise ValueError(f"{index_url}: shard name(s) {listing(nested)} refused: a shard is a "
                         f"safetensors file, not another shard index")
    return shards


def _read_shards(index_url: str, mmap: bool) -> dict[str, torch.Tensor]:
    """The tensors of the shards an index lists, checked against it: every shard present, each
    holding exactly the keys the index gives it, no key in two shards."""
    shards = _shard_index(index_url)
    folder = posixpath.dirname(index_url)
    urls = {s: storage.join(folder, s) if folder else s for s in shards}
    not_files = set(url_listing.missing_files(list(urls.values())))  # one listing per S3 prefix
    absent = [s for s, url in urls.items() if url in not_files]
    if absent:
        raise FileNotFoundError(f"{index_url}: {len(absent)} shard file(s) it lists are missing "
                                f"{listing(absent)}")
    state: dict[str, torch.Tensor] = {}
    holder: dict[str, str] = {}
    for shard, keys in shards.items():
        tensors = _read_file(urls[shard], mmap)
        twice = [f"{k} ({holder[k]} and {shard})" for k in tensors if k in holder]
        if twice:
            raise ValueError(f"{index_url}: {len(twice)} key(s) in two shards {listing(twice)}")
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise ValueError(f"{index_url}: {len(absent)} key(s) it lists in {shard} are not in "
                             f"that file {listing(absent)}")
        holder.update(dict.fromkeys(tensors, shard))
        state.update(tensors)
    listed = {k for keys in shards.values() for k in keys}
    unlisted = [f"{k} (in {holder[k]})" for k in state if k not in listed]
    if unlisted:
        raise ValueError(f"{index_url}: {len(unlisted)} key(s) of its shards it does not list "
                         f"{listing(unlisted)}")
    return state


def compressed_records(source: str | bytes) -> list[str]:
    """The records of a torch.save file (a local path or its bytes) that are stored compressed;
    [] for a file that is not a zip (the legacy format: torch checks each storage against the
    bytes left). torch.save stores records as they are, so no tensor outgrows the file, but
    torch.load also inflates deflated ones: a 2 MB file allocated 2 GB (a few MB more, the
    machine). ValueError for a zip that cannot be read."""
    with (open(source, "rb") if isinstance(source, str) else io.BytesIO(source)) as f:
        if f.read(4) != b"PK\x03\x04":  # how torch.load tells a zip
            return []
        try:
            return [i.filename for i in zipfile.ZipFile(f).infolist()
                    if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size]
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            raise ValueError(f"not a readable zip ({exc})") from None


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def state_dict_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        dtype: torch.dtype | None = None) -> list[str]:
    """Why `state` cannot replace a module's state dict `expected` (empty: it can): missing and
    unexpected keys, shape mismatches, integer tensors for float parameters, NaN or inf values
    once in the dtype the model will use (`dtype`, default each parameter's own: a float64
    1e300 is inf in float32), as a model loaded from them would compute garbage. Meta tensors
    are checked for shape only."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    common = [k for k in expected if k in state]
    shapes = [f"{k}: expected {list(expected[k].shape)} got {list(state[k].shape)}"
              for k in common if expected[k].shape != state[k].shape]
    dtypes = [f"{k}: {state[k].dtype}" for k in common
              if expected[k].is_floating_point() and not state[k].is_floating_point()]
    nonfinite = [k for k in common if state[k].is_floating_point() and not state[k].is_meta
                 and expected[k].is_floating_point()
                 and not _finite_as(state[k], dtype or expected[k].dtype)]
    parts = [f"{len(items)} {what} {listing(items)}" for what, items in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected),
        ("shape mismatch(es)", shapes), ("non-float tensor(s) for float parameters", dtypes),
        ("tensor(s) with NaN or inf values", nonfinite)) if items]
    prefix = _shared_prefix(missing, unexpected)
    if prefix:
        parts.append(f"every key carries an extra prefix {prefix!r} (strip it from the file)")
    return parts


def _finite_as(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN or inf in `value` once cast to `dtype`. Only a cast to a narrower range can
    overflow, so only then is a copy made; float8, which torch.isfinite does not take, is
    checked in float32."""
    if value.dtype != dtype and torch.finfo(value.dtype).max > torch.finfo(dtype).max:
        value = value.to(dtype)
    if value.element_size() == 1:
        value = value.float()
    return bool(torch.isfinite(value).all())


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
