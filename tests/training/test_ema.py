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
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.updates == 1
    live = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in(net) as module:
        assert module is net and torch.equal(net.weight, ema.shadow["weight"])
        with pytest.raises(RuntimeError):  # an error inside still restores the live weights
            with ema.swapped_in(net):
                raise RuntimeError("sampling failed")
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k]), k


@pytest.mark.parametrize("edit, named", [
    (lambda s: {"updates": 3, "shadow": {"weight": s["weight"]}}, r"missing key\(s\) \[bias\]"),
    (lambda s: {"updates": 3, "shadow": {**s, "extra": s["bias"]}}, r"unexpected key\(s\) \[extra\]"),
    (lambda s: {"updates": 3, "shadow": {**s, "bias": s["bias"] * float("nan")}}, r"NaN or inf values \[bias\]"),
    (lambda s: {"updates": 3, "shadow": {**s, "bias": s["bias"][:1]}}, r"bias: expected \[2\] got \[1\]"),
    (lambda s: {"updates": 3, "shadow": [s["bias"]]}, "expected {'shadow'"),
])
def test_a_state_that_does_not_fit_is_refused_and_nothing_loaded(edit, named):
    """A partial shadow once loaded silently (the rest stayed at the live weights) and a NaN one
    went into exports; both pass a checkpoint's digest when the trainer saved them."""
    torch.manual_seed(0)
    ema = EMA(nn.Linear(3, 2), decay=0.9)
    good = {k: v + 1 for k, v in ema.shadow.items()}
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with pytest.raises(ValueError, match=named):
        ema.load_state_dict(edit(good))
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before) and ema.updates == 0
    ema.load_state_dict({"updates": 3, "shadow": good})
    assert torch.equal(ema.shadow["bias"], good["bias"]) and ema.updates == 3


class _Tied(nn.Module):
    """An LLM's shape in small: the output projection is the input embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_parameter_is_averaged_once_and_given_under_each_name():
    """The shadow held the tied weight under embed.weight only: a reader overlaying it on the
    module's state dict (a checkpoint sampled, the tokenizer's export) got head.weight live."""
    torch.manual_seed(0)
    net = _Tied()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.embed.weight.add_(1.0)
    ema.update(net)
    assert list(ema.shadow) == ["embed.weight"] and not torch.equal(ema.shadow["embed.weight"],
                                                                   net.embed.weight)
    saved = ema.state_dict()["shadow"]
    merged = ema.module_state_dict(net)
    for name in ("embed.weight", "head.weight"):
        assert torch.equal(saved[name], ema.shadow["embed.weight"]), name
        assert torch.equal(merged[name], ema.shadow["embed.weight"]), name
    # A checkpoint written before the other names were listed loads, and so does one with them.
    other = EMA(_Tied(), decay=0.5)
    other.load_state_dict({"updates": 1, "shadow": {"embed.weight": saved["embed.weight"]}})
    assert torch.equal(other.shadow["embed.weight"], saved["embed.weight"])
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.state_dict()["shadow"]["head.weight"], saved["embed.weight"])
