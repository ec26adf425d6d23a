"""ZeRO-3 partitions the model while it is built: no rank holds a whole copy of any parameter,
and the partitions hold exactly the weights a plain build has (the LLM read from its files,
the mean-initialised new embedding rows, our freshly initialised modules), in bf16."""

import dataclasses
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from bdt.config import load
from bdt.training.ar import model_build
from bdt.training.ar.config import TrainConfig
from bdt.training.ar.flops import FlopModel
from testkit import TINY_CONFIG
from trainutil import spawn_build, tiny_llm, train_overrides

pytestmark = pytest.mark.slow


def test_zero3_build_partitions_every_parameter_with_the_plain_values(tmp_path):
    llm = tiny_llm(str(tmp_path / "llm"))
    overrides = train_overrides(str(tmp_path / "run"), llm, "unused", zero=3, precision="bf16")
    spawn_build(["--config", TINY_CONFIG, *overrides], str(tmp_path))
    ranks = [json.loads((tmp_path / f"local_{r}.json").read_text()) for r in (0, 1)]
    assert all(r["zero3_enabled"] for r in ranks)
    gathered = load_file(str(tmp_path / "full.safetensors"))

    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], overrides + ["deepspeed.zero_stage=0"]))
    torch.manual_seed(cfg.seed)
    plain, _ = model_build.build_model(cfg, {})
    # FLOPs and the sdpa row costs count the decoder's weights: in full, partitioned or not
    assert all(r["flops"] == dataclasses.asdict(FlopModel.for_model(plain)) for r in ranks)
    assert all(r["layer_costs"] == list(plain._layer_costs) for r in ranks)
    expected = dict(plain.named_parameters())
    assert gathered.keys() == expected.keys()
    for name, full in gathered.items():
        held = [r["local"][name] for r in ranks]
        # half each (DeepSpeed pads the last partition), nothing left whole on either rank
        assert held == [math.ceil(full.numel() / 2)] * 2, name
        assert all(r["shape_now"][name] == [0] for r in ranks), name
        assert full.dtype == torch.bfloat16, name
        want = expected[name].detach().to(torch.bfloat16)
        if name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
            # rows added for BitDance's tokens: the mean of the old rows, here taken over
            # bf16 rows (ZeRO-3 casts while loading), there over fp32 ones
            old = json.loads((tmp_path / "llm" / "config.json").read_text())["vocab_size"]
            assert torch.equal(full[:old], want[:old]) and torch.equal(full[-1], full[old]), name
            torch.testing.assert_close(full[old:], want[old:], rtol=0, atol=2e-3)
        else:
            assert torch.equal(full, want), name


def test_zero3_refuses_a_nan_held_by_one_rank(tmp_path):
    """Partitioned at load, no rank sees a whole weight: the NaN in the last element lies in
    rank 1's half, and the build must still be refused, naming the tensor."""
    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    llm = tiny_llm(str(tmp_path / "llm"))
    path = tmp_path / "llm" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.1.mlp.up_proj.weight"].view(-1)[-1] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    overrides = train_overrides(str(tmp_path / "run"), llm, "unused", zero=3, precision="bf16")
    with pytest.raises(mp.ProcessRaisedException,
                       match=r"NaN or inf values in 1 tensor\(s\) \[model\.layers\.1\.mlp\.up_proj"):
        spawn_build(["--config", TINY_CONFIG, *overrides], str(tmp_path))
