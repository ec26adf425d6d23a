"""The KV cache of sampling (method §4: each AR step feeds one block of P tokens against it).

A layer keeps the keys its queries can still see. The next block of a row starts at position
n, the row's count of real keys (left padding comes first, and a row's keys are contiguous in
the cache). Its first query sees keys from n - W + 1 in a sliding layer of window W, from
n - n mod C in a chunked layer of chunk C (`LayerRule`), its later queries no older ones. So a
sliding layer keeps the last W - 1 keys, a chunked one the last n mod C of the row whose n mod C
is largest (the others' older keys stay masked), a full layer every key. Without this, local
layers' caches grew with the image although their attention never looked back further.
transformers' own sliding layer (`DynamicCache(config=...)`, its chunked layers' too, keeping
C - 1 keys) is not used: at W = 1 it keeps every key, and it needs masks of its own sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from bdt.model.attention_masks import FULL, LayerRule


def keys_kept(rule: LayerRule, key_valid_BK: Tensor) -> int:
    """How many of the keys so far (the newest) a layer under `rule` keeps for the next block;
    key_valid_BK marks the real ones (False at left padding)."""
    kept = key_valid_BK.shape[1]
    if rule.window is not None:
        kept = min(kept, rule.window - 1)
    if rule.chunk is not None:  # one sync per step: the cache's size is a host number
        kept = min(kept, int((key_valid_BK.sum(1) % rule.chunk).max()))
    return kept


def kv_cache(layer_types: Sequence[str], rules: Mapping[str, LayerRule]):
    """An empty cache for a decoder whose layer i has type layer_types[i] (the config's
    layer_types); after each step, `drop_unseen` bounds its local layers as `keys_kept` says
    (`rules`: `backbone_config.layer_rules`)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BoundedCache(Cache):
        """DynamicLayers, each under its type's rule."""

        def __init__(self):
            super().__init__(layers=[DynamicLayer() for _ in layer_types])
            self.rules = [rules.get(kind, FULL) for kind in layer_types]

        def drop_unseen(self, key_valid_BK: Tensor) -> None:
            """Drop the keys no later block can see, once a step's attention is done;
            key_valid_BK marks the real keys of all steps so far, this one's included."""
            kept = {rule: keys_kept(rule, key_valid_BK) for rule in set(self.rules) - {FULL}}
            for layer, rule in zip(self.layers, self.rules):
                if rule == FULL or not layer.is_initialized:
                    continue
                start = layer.keys.shape[-2] - kept[rule]
                if start > 0:  # copies: a view would hold the dropped keys' memory
                    layer.keys = layer.keys[..., start:, :].clone()
                    layer.values = layer.values[..., start:, :].clone()

    return BoundedCache()
