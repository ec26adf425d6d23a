"""The KV cache of sampling (method §4: each AR step feeds one block of P tokens against it).

A layer keeps the keys its queries can still see. A full or chunked layer keeps every key; a
sliding layer of window W only the last W - 1: the next block's first query, at position n,
sees keys at n - W + 1 .. n - 1 and the block itself (`LayerRule`), later queries fewer old
ones, and the keys of a row are contiguous in the cache (left padding comes first). Without
this, a sliding layer's cache grew with the image although its attention never looked back
more than W tokens. transformers' own sliding layer (`DynamicCache(config=...)`) is not used:
at W = 1 it keeps every key, and it needs masks of its own sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from bdt.model.attention_masks import LayerRule


def keys_kept(rule: LayerRule, cached: int) -> int:
    """How many of the `cached` keys (the newest) a layer under `rule` keeps for the next block."""
    return cached if rule.window is None else min(cached, rule.window - 1)


def kv_cache(layer_types: Sequence[str], rules: Mapping[str, LayerRule]):
    """A cache for a decoder whose layer i has type layer_types[i] (the config's layer_types),
    its sliding layers bounded as `keys_kept` says (`rules`: `backbone_config.layer_rules`)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class WindowLayer(DynamicLayer):
        """A DynamicLayer that, once this step's attention has all its keys, drops the keys
        no later block can see."""

        def __init__(self, rule: LayerRule):
            super().__init__()
            self.rule = rule

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            keys, values = super().update(key_states, value_states)
            start = keys.shape[-2] - keys_kept(self.rule, keys.shape[-2])
            if start:  # copies: a view would hold the dropped keys' memory
                self.keys, self.values = keys[..., start:, :].clone(), values[..., start:, :].clone()
            return keys, values

    return Cache(layers=[WindowLayer(rules[kind])
                         if kind in rules and rules[kind].window is not None else DynamicLayer()
                         for kind in layer_types])
