"""The AR loop's per-rank state re-split hands the stage's manifest counts to the stream's."""

import json

from bdt.data.shard_source import ShardList
from bdt.data.token_stream import TokenStream
from bdt.training.ar.reshard import STREAM_PREFIX, resplit_train_states
from trainutil import shard_opens, unconsumed_keys, write_shards


def test_reshard_counts_by_the_manifest(tmp_path, monkeypatch):
    urls = write_shards(str(tmp_path), [(4, 4), (4, 8)], num_shards=12, per_shard=3)
    old = []
    for rank in range(2):
        stream = TokenStream(urls, rank, 2, 160, lambda s: 12 + s.grid[0] * s.grid[1],
                             buffer_size=4, seed=3, bits_per_token=16)
        stream.next_batch()
        meta, tensors = stream.state_dict()
        old.append(({"step": 5, "stage": 0, "seen": {"tokens": 7, "images": 2}, "stream":
                     json.loads(json.dumps(meta))},
                    {STREAM_PREFIX + k: v for k, v in tensors.items()}))
    opened = shard_opens(monkeypatch)
    shards = ShardList(urls, {}, str(tmp_path), samples={u: 3 for u in urls})
    new = resplit_train_states(lambda stage: shards, lambda stage: 3)(old, 3)
    assert len(opened) <= 2  # the cut shards only; before, every owed shard (~20) was read
    owed = [len(unconsumed_keys(s["stream"], urls, r, 3)) for r, (s, _) in enumerate(new)]
    assert max(owed) - min(owed) <= 1
    assert [s["seen"] for s, _ in new] == [{"tokens": 14, "images": 4}] + \
        [{"tokens": 0, "images": 0}] * 2
