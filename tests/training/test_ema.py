"""The EMA of the weights: the average it keeps, and swapping it in and out bit for bit."""

import pytest
import torch
from torch import nn

from bdt.training.ema import EMA


def test_average_follows_the_warmed_up_decay_and_swaps_back_exactly():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # decay min(0.5, 2/11): the warm-up ramp rules the first updates
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], d * start["weight"] + (1 - d) * net.weight)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in(net) as module:
        assert module is net and torch.equal(net.weight, ema.shadow["weight"])
        with pytest.raises(RuntimeError):  # an error inside still restores the live weights
            with ema.swapped_in(net):
                raise RuntimeError("sampling failed")
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k]), k
