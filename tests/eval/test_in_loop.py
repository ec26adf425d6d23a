"""In-loop evaluation on a live tiny model: the report under <run_dir>/eval/step_N/, and what the
training run it observes keeps (global RNG, train mode)."""

import json
import os

import torch

from bdt.eval.in_loop import InLoopEval
from bdt.eval.suite import load_suite
from bdt.model.ar import BitDanceModel
from bdt.model.backbone import BackboneConfig, make_tiny_llm
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.training.ar.config import EvalConfig
from testkit import save_tiny_image_tokenizer


def test_a_step_evaluated_again_replaces_its_report_whole(tmp_path):
    """A run resumed from before an evaluated step evaluates it again, maybe with other eval
    settings: the second report's images once mixed with the first one's in images/."""
    llm = make_tiny_llm(str(tmp_path / "llm"), [item["prompt"] for item in load_suite()],
                        hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    decoder = save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    torch.manual_seed(0)
    model = BitDanceModel.from_config(ModelConfig(
        backbone=BackboneConfig(path=llm), parallel_num=4, attn_backend="sdpa",
        head=HeadConfig(width=32, depth=2, num_adaln_sets=1, head_dim=16, bits=16)))
    model.train()
    rng = torch.get_rng_state()
    report = tmp_path / "run" / "eval" / "step_000000004"
    for per_category in (2, 1):
        cfg = EvalConfig(every=4, per_category=per_category, width=8, height=8, steps=1)
        task = InLoopEval(cfg, decoder, str(tmp_path / "run"), seed=0, takes_part=True,
                          writes=True)
        task.check(model)
        metrics = task.run(4, model)
        assert model.training and torch.equal(torch.get_rng_state(), rng)
    items = json.loads((report / "eval.json").read_text())["items"]
    assert len(items) == 6 and metrics["eval_overall"] >= 0
    assert sorted(os.listdir(report / "images")) == sorted(f"{i['id']}.png" for i in items)
    assert os.listdir(tmp_path / "run" / "eval") == ["step_000000004"]  # no staging folder left
