"""The token-shard format (schema 1): round trip through a real tar, and clear errors on bad samples."""

import io
import json
import re

import numpy as np
import pytest
import webdataset as wds

from bdt.data.token_shards import TokenSample, decode_sample, encode_sample, iter_token_shard, sample_key

_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def _sample(key="k1") -> TokenSample:
    rng = np.random.default_rng(0)
    return TokenSample(key=key, bits_hwB=rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), bits_per_token=32,
                       bucket=(80, 48), caption="a red circle ✓", source_key="dir/k.1", source_shard="s3://b/x.tar",
                       stage="256")


def test_round_trip_through_a_tar(tmp_path):
    path = str(tmp_path / "t.tar")
    with wds.TarWriter(path, encoder=False) as w:
        w.write(encode_sample(_sample("a")))
        w.write(encode_sample(_sample("b")))
    got = list(iter_token_shard(path))
    assert [s.key for s in got] == ["a", "b"]
    want = _sample("a")
    np.testing.assert_array_equal(got[0].bits_hwB, want.bits_hwB)
    assert got[0].grid == (3, 5) and got[0].bucket == (80, 48) and got[0].caption == want.caption
    assert got[0].source_key == "dir/k.1" and got[0].source_shard == "s3://b/x.tar" and got[0].stage == "256"
    assert got[0].caption_ids is None  # never stored: the trainer tokenizes with its model's tokenizer
    plain = next(iter(wds.WebDataset(path, shardshuffle=False)))  # readable without bdt
    assert json.loads(plain["json"])["schema"] == 1 and plain["txt"].decode() == want.caption


def test_captions_read_as_extraction_reads_them():
    """A hand-made shard's caption with a byte-order mark and a trailing newline: extraction
    would have stored "a red circle"; the token readers trained on "\ufeffa red circle\n"."""
    raw = encode_sample(_sample())
    assert decode_sample(dict(raw, txt="\ufeffa red circle\n".encode())).caption == "a red circle"
    assert decode_sample(dict(raw, txt=b"  two blue squares ")).caption == "two blue squares"


def test_bad_samples_name_the_problem():
    raw = encode_sample(_sample())
    with pytest.raises(ValueError, match="missing member 'bits.npy'"):
        decode_sample({k: v for k, v in raw.items() if k != "bits.npy"})
    meta = json.loads(raw["json"])
    with pytest.raises(ValueError, match="schema 99"):
        decode_sample(dict(raw, json=json.dumps(dict(meta, schema=99)).encode()))
    with pytest.raises(ValueError, match=r"metadata says uint8 \[4, 5, 4\]"):
        decode_sample(dict(raw, json=json.dumps(dict(meta, h=4)).encode()))
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="unpickling"):  # object arrays are never unpickled
        decode_sample(dict(raw, **{"bits.npy": buf.getvalue()}))
    with pytest.raises(ValueError, match="uint8"):
        encode_sample(TokenSample("k", np.zeros((2, 2, 4), np.int32), 32, (32, 32), "c", "k", "s", "1"))


def test_sample_keys_are_webdataset_safe_and_distinct():
    assert sample_key("a/b.c d") == "a_b_c_d" and sample_key("000123") == "000123"
    taken = set()
    for source in ["a b", "a_b", "猫", "狗", "", "caf\\xe9"]:  # once: "a_b" twice, "_" three times
        key = sample_key(source, taken)
        assert _SAFE.fullmatch(key) and key not in taken
        taken.add(key)
    assert {"a_b", "_"} < taken and len(taken) == 6  # the first comers keep the plain key


@pytest.mark.parametrize("meta,problem", [
    ([], "json member holds a list"), (None, "json member holds a NoneType"),
    ({"h": 0}, "h=0"), ({"bits_per_token": 12}, "bits_per_token=12"),
    ({"bucket": "ab"}, "bucket='ab'"),
])
def test_hostile_metadata_is_a_value_error_naming_the_sample(meta, problem):
    """Never an AttributeError (which once stopped training) nor a grid of zero tokens."""
    raw = dict(encode_sample(_sample("k9")), __url__="x.tar")
    bad = dict(json.loads(raw["json"]), **meta) if isinstance(meta, dict) else meta
    with pytest.raises(ValueError, match=f"^sample k9 in x.tar: .*{re.escape(problem)}"):
        decode_sample(dict(raw, json=json.dumps(bad).encode()))
