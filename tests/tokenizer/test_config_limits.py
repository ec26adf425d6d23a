"""Hostile image-tokenizer config values are refused by name before the model is built (a huge
value would otherwise overflow torch's storage size or hang building millions of blocks)."""

import pytest

from bdt.tokenizer.config import TokenizerConfig

TINY = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4)


@pytest.mark.parametrize("changes, named", [
    ({"ch": 8 * 10**8}, "ch\\*ch_mult"),
    ({"ch_mult": [1] * 40}, "len\\(ch_mult\\)"),
    ({"num_res_blocks": 10**6}, "num_res_blocks"),
    ({"z_channels": 2**30}, "z_channels"),
])
def test_huge_sizes_are_refused_by_name(changes, named):
    with pytest.raises(ValueError, match=named + " is \\d+, above the limit"):
        TokenizerConfig.from_dict({**TINY, **changes})


def test_released_sizes_pass_the_limits():
    TokenizerConfig(ch_mult=[1, 1, 2, 2, 4, 8], z_channels=256).validate()


@pytest.mark.parametrize("changes, named", [
    ({"ch": -8, "ch_mult": [-1, -2]}, "ch and every ch_mult must be >= 1"),  # widths come out positive
    ({"in_channels": 0}, r"in_channels must be in \[1, 16\]"),
    ({"out_ch": -3}, r"out_ch must be in \[1, 16\]"),
    ({"in_channels": 10**8}, r"in_channels must be in \[1, 16\]"),
])
def test_sizes_no_model_can_take_are_refused_by_name(changes, named):
    with pytest.raises(ValueError, match=named):
        TokenizerConfig.from_dict({**TINY, **changes})
