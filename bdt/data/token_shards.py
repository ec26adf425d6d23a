"""The token-shard format: what pre-extraction writes and training reads (schema version 1).

A token shard is a plain webdataset tar; one sample = the members sharing a key:

  KEY.bits.npy  uint8 [h, w, C/8]: the token grid of one image, bits packed LSB first
                (bdt.tokenizer.bits.pack_bits); h x w = bucket (W/f, H/f) with f the
                tokenizer's downsample factor. Saved with np.save; load with allow_pickle=False.
  KEY.txt       the caption, UTF-8.
  KEY.json      {"schema": 1, "h", "w", "bits_per_token", "bucket": [W, H], "stage",
                 "source_key", "source_shard"}: the grid, the pixel bucket it came from, and
                 where the image was read (traceability to the raw data).

No caption token ids are stored: the AR model's caption tokens are its own LLM tokenizer's, with
special tokens added per model (bdt.model.text_tokenizer), so stored ids would be right only
for one model setup and silently wrong for any other. Tokenizing at training time is cheap: once
per sample as it enters the stream, under a millisecond (0.58 ms per shapes caption measured on
this 2-core machine at load 15), and the LLM itself is the text encoder, so no heavier text
feature could be cached. `TokenSample.caption_ids` is the trainer's in-memory cache.

Keys are the source keys with anything outside [A-Za-z0-9_-] replaced by "_" (webdataset
splits a member name at its first dot), plus a hash of the source key where another source key
of the shard already made that key ("a b" / "a_b", or "猫" / "狗"), and a counter after it
while that is taken too; they are unique within a
shard, and (shard, key) is unique within a family (two raw shards may reuse a key). A family
of shards for one stage resolution lives in its own directory next to a manifest
(bdt/extract/manifest.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Container, Iterator, Mapping

import numpy as np

from bdt.data.tars import MAX_MEMBER_BYTES, TarSample, read_samples, readable

SCHEMA_VERSION = 1
BITS_EXT = "bits.npy"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# What a token reader reads of a member at most; a larger one is left unread and its sample
# skipped. A caption of a MiB is ~240k tokens, more than any row packs, and tokenizing it cost
# 0.7 s and 115 MB (32 MiB: 51 s and 2.4 GB), so a few such members, a few hundred KB as gzip,
# would stall a data worker again after every resume. 16x extraction's default
# max_caption_bytes, which its config keeps below this.
MAX_CAPTION_BYTES = 1 << 20
MAX_METADATA_BYTES = 64 << 10
# Caption problems, also extraction's reject reasons for a raw caption.
EMPTY_CAPTION = "empty_caption"
CAPTION_CONTROL_CHAR = "caption_control_char"
_CAPTION_WHITESPACE = "\t\n\r"  # control characters a caption may hold (as spacing)


@dataclass
class TokenSample:
    key: str
    bits_hwB: np.ndarray  # uint8 [h, w, C/8], packed
    bits_per_token: int
    bucket: tuple[int, int]  # (W, H) pixels
    caption: str
    source_key: str
    source_shard: str
    stage: str
    caption_ids: np.ndarray | None = None  # int32 [L]: filled by the trainer, never stored

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) tokens."""
        return int(self.bits_hwB.shape[0]), int(self.bits_hwB.shape[1])


def sample_key(source_key: str, taken: Container[str] = ()) -> str:
    """The shard key of a source key, never one in `taken`: a taken key gets a hash of the source
    key appended, then a counter while that too is taken (another source key may be spelled
    like it, 'a_b-<hash of "a b">'), so distinct samples are not lost as duplicates. The same
    keys taken in the same order give the same key."""
    key = _UNSAFE_KEY_CHARS.sub("_", source_key) or "_"
    if key not in taken:
        return key
    hashed = key + "-" + hashlib.sha256(source_key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    candidate, n = hashed, 1
    while candidate in taken:
        candidate, n = f"{hashed}-{n}", n + 1
    return candidate


def member_limit(ext: str) -> int:
    """The most bytes a token reader reads of a member with this extension."""
    return {"txt": MAX_CAPTION_BYTES, "json": MAX_METADATA_BYTES}.get(ext, MAX_MEMBER_BYTES)


def caption_text(raw: bytes) -> str:
    """A .txt member as caption text, the same on every path that reads one (extraction, the
    token readers, init-tiny): UTF-8 (UnicodeDecodeError otherwise) without a byte-order mark
    or surrounding whitespace, neither of which is part of what the caption says."""
    return raw.decode("utf-8-sig").strip()


def caption_problem(text: str) -> tuple[str, str] | None:
    """(reason, detail) when a caption shows nothing (empty, only spaces or format characters)
    or holds a control character other than tab and line breaks; None when it is usable."""
    if all(c.isspace() or unicodedata.category(c) == "Cf" for c in text):
        return EMPTY_CAPTION, ""
    bad = next((i for i, c in enumerate(text)
                if unicodedata.category(c) == "Cc" and c not in _CAPTION_WHITESPACE), None)
    if bad is not None:
        return CAPTION_CONTROL_CHAR, f"U+{ord(text[bad]):04X} at character {bad}"
    return None


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) of one .npy file's bytes; ValueError when they are not one
    array of the size its header declares (checked before anything is allocated: a header may
    claim terabytes). The header is parsed by numpy's own reader once per distinct header (a
    shard repeats a few): its literal_eval was ~45 us of the ~60 us a small sample took to load."""
    size = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else \
        12 + int.from_bytes(data[8:12], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:size]))
    count = math.prod(shape)
    # Extra bytes mean bits packed with another count than the header's: as wrong as too few.
    if min(shape, default=0) < 0 or len(data) - size != count * dtype.itemsize:
        raise ValueError(f"npy data holds {len(data) - size} bytes, its header says {shape} "
                         f"{dtype}")
    flat = np.frombuffer(data, dtype, count=count, offset=size)
    return flat.reshape(shape, order="F" if fortran else "C").copy()  # writable, like np.load


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read(f)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's parser lets a bad header raise TokenError,
        # SyntaxError, TypeError or MemoryError: bad data, like its ValueErrors
        raise ValueError(f"unreadable npy header ({type(e).__name__}: {str(e)[:200]})") from None
    if dtype.hasobject:
        raise ValueError("npy data of Python objects: refused (it would need unpickling)")
    return shape, fortran, dtype


def encode_sample(s: TokenSample) -> dict[str, Any]:
    """TokenSample -> the webdataset dict (bytes values) that TarWriter(encoder=False) writes."""
    if s.bits_hwB.dtype != np.uint8 or s.bits_hwB.ndim != 3 or s.bits_hwB.shape[-1] * 8 != s.bits_per_token:
        raise ValueError(f"sample {s.key}: bits must be uint8 [h, w, {s.bits_per_token // 8}], "
                         f"got {s.bits_hwB.dtype} {list(s.bits_hwB.shape)}")
    h, w = s.grid
    meta = {"schema": SCHEMA_VERSION, "h": h, "w": w, "bits_per_token": s.bits_per_token,
            "bucket": list(s.bucket), "stage": s.stage, "source_key": s.source_key,
            "source_shard": s.source_shard}
    out = {"__key__": s.key, BITS_EXT: _npy_bytes(s.bits_hwB), "txt": s.caption.encode("utf-8"),
           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return out


def decode_sample(raw: Mapping[str, Any]) -> TokenSample:
    """A webdataset dict (member extension -> bytes) -> TokenSample, with the schema checked.

    Raises ValueError naming the sample and the problem (missing member, metadata that is not
    schema 1's, a grid that disagrees with the metadata or its bucket, packed bits of another
    size than the grid's, a caption that is not UTF-8).
    """
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "")
    where = f"sample {key}" + (f" in {url}" if url else "")
    try:
        return _decode(raw, key)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except (KeyError, TypeError, IndexError) as e:  # a metadata field missing or mistyped
        raise ValueError(f"{where}: bad metadata ({type(e).__name__}: {e})") from None


def _decode(raw: Mapping[str, Any], key: str) -> TokenSample:
    for ext in (BITS_EXT, "json", "txt"):
        if ext not in raw:
            raise ValueError(f"missing member '{ext}' (has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser
        raise ValueError(f"json member is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"json member holds a {type(meta).__name__}, not an object")
    if meta.get("schema") != SCHEMA_VERSION or type(meta["schema"]) is not int:  # true == 1
        raise ValueError(f"token-shard schema {meta.get('schema')!r}, this reader knows {SCHEMA_VERSION}")
    h, w, bits_per_token = meta["h"], meta["w"], meta["bits_per_token"]
    if not all(type(v) is int and v > 0 for v in (h, w, bits_per_token)) or bits_per_token % 8:
        raise ValueError(f"metadata h={h!r} w={w!r} bits_per_token={bits_per_token!r}: expected "
                         f"positive integers, bits_per_token a multiple of 8")
    bits = load_npy(raw[BITS_EXT])
    expected = (h, w, bits_per_token // 8)
    if bits.dtype != np.uint8 or tuple(bits.shape) != expected:
        raise ValueError(f"bits are {bits.dtype} {list(bits.shape)}, metadata says uint8 {list(expected)}")
    bucket = meta["bucket"]
    # The bucket is the grid times the tokenizer's downsample factor, the same on both sides:
    # another relation means another tokenizer or a mislabelled grid.
    if not (isinstance(bucket, list) and len(bucket) == 2
            and all(type(v) is int and v > 0 for v in bucket)
            and bucket[0] % w == 0 and bucket[1] % h == 0 and bucket[0] // w == bucket[1] // h):
        raise ValueError(f"metadata bucket={bucket!r}: expected [W, H] px, the {h}x{w} token "
                         f"grid times one downsample factor")
    for field in ("source_key", "source_shard", "stage"):
        if not isinstance(meta[field], str):
            raise ValueError(f"metadata {field}={meta[field]!r}: expected a string")
    caption = caption_text(raw["txt"])
    problem = caption_problem(caption)
    if problem is not None:  # extraction writes neither: not a caption to train on
        raise ValueError(f"caption refused: {problem[0]} {problem[1]}".rstrip())
    return TokenSample(key=key, bits_hwB=bits, bits_per_token=bits_per_token,
                       bucket=(bucket[0], bucket[1]), caption=caption,
                       source_key=meta["source_key"], source_shard=meta["source_shard"],
                       stage=meta["stage"])


def decode_tar_sample(sample: TarSample, url: str = "") -> TokenSample:
    """decode_sample of a sample as bdt.data.tars read it (members over `member_limit` left
    unread); ValueError also when one of its members was not read: a link or device, over its
    limit, or a second copy (which of two was meant is not knowable)."""
    if sample.refused:
        refused = ", ".join(f"{readable(name)} ({why}, {size} bytes)"
                            for name, why, size in sample.refused[:4])
        raise ValueError(f"sample {sample.key}" + (f" in {url}" if url else "")
                         + f": member(s) not read: {refused}")
    return decode_sample(sample.as_dict(url))


def read_token_samples(url: str, offset: int = 0) -> Iterator[TarSample]:
    """The samples of one token shard from byte `offset`, members over `member_limit` unread."""
    return read_samples(url, offset, max_bytes=member_limit)


def iter_token_shard(url: str) -> Iterator[TokenSample]:
    """Decoded samples of one token shard (local path or fsspec URL), in stored order."""
    for sample in read_token_samples(url):
        if sample.members:
            yield decode_tar_sample(sample, url)
