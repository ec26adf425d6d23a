"""Sampling's bounded KV cache: the keys a local layer keeps, and its mask over them."""

import pytest
import torch

from bdt.model.attention_masks import FULL, LayerRule, decode_attention_mask
from bdt.model.kv_cache import keys_kept


@pytest.mark.parametrize("rule", [FULL, LayerRule(window=1), LayerRule(window=3),
                                  LayerRule(chunk=1), LayerRule(chunk=3), LayerRule(chunk=8),
                                  LayerRule(window=5, chunk=4)], ids=str)
def test_kept_keys_are_all_a_block_sees_and_their_mask_is_the_full_ones(rule):
    """Rows of 0, 5, 7 and 13 real keys (left padding) before a block of P = 4: the keys a
    layer drops are masked for every query, the oldest it keeps is seen by some row, and the
    mask over the kept keys, positions counted on from the dropped ones, is the full mask's
    last columns (without that count a chunk's cut falls elsewhere)."""
    K, P = 13, 4
    valid_BK = torch.arange(K) >= K - torch.tensor([[0], [5], [7], [13]])
    full = decode_attention_mask(valid_BK, P, rule=rule)
    start = K - keys_kept(rule, valid_BK)
    assert not full[..., :start].any()
    if start < K:
        assert full[..., start].any()
    bounded = decode_attention_mask(valid_BK[:, start:], P, rule=rule,
                                    dropped_B=valid_BK[:, :start].sum(1))
    assert torch.equal(bounded, full[..., start:])
