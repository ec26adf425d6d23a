"""In-loop evaluation on a live tiny model: the report under <run_dir>/eval/step_N/, and what the
training run it observes keeps (global RNG, train mode)."""

import json
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as tdist

from bdt.eval.in_loop import InLoopEval, shared_images
from bdt.eval.suite import load_suite
from bdt.generation.sampling import SamplingConfig
from bdt.generation.trained import TrainedModel
from bdt.model.ar import BitDanceModel
from bdt.model.backbone import make_tiny_llm
from bdt.model.backbone_config import BackboneConfig
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.training.ar.config import EvalConfig
from bdt.training.distributed import free_port
from bdt.tokenizer.io import load_tokenizer
from testkit import save_tiny_image_tokenizer
from trainutil import loopback_gloo_group, rank_entry, spawn_ranks


def _tiny_model(llm: str) -> BitDanceModel:
    torch.manual_seed(0)
    return BitDanceModel.from_config(ModelConfig(
        backbone=BackboneConfig(path=llm), parallel_num=4, attn_backend="sdpa",
        head=HeadConfig(width=32, depth=2, num_adaln_sets=1, head_dim=16, bits=16)))


def _go_on(together: bool) -> None:
    """A stop point that never stops."""


def _tiny_llm(out: str) -> str:
    return make_tiny_llm(out, [item["prompt"] for item in load_suite()], hidden=32, layers=1,
                         heads=2, kv_heads=1, intermediate=64)


def test_a_step_evaluated_again_replaces_its_report_whole(tmp_path):
    """A run resumed from before an evaluated step evaluates it again, maybe with other eval
    settings: the second report's images once mixed with the first one's in images/."""
    llm = _tiny_llm(str(tmp_path / "llm"))
    decoder = save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    model = _tiny_model(llm)
    model.train()
    rng = torch.get_rng_state()
    report = tmp_path / "run" / "eval" / "step_000000004"
    for per_category in (2, 1):
        cfg = EvalConfig(every=4, per_category=per_category, width=8, height=8, steps=1)
        task = InLoopEval(cfg, decoder, str(tmp_path / "run"), seed=0, collective=False,
                          writes=True)
        task.check(model)
        metrics = task.run(4, model, _go_on)
        assert model.training and torch.equal(torch.get_rng_state(), rng)
    items = json.loads((report / "eval.json").read_text())["items"]
    assert len(items) == 6 and metrics["eval_overall"] >= 0
    assert sorted(os.listdir(report / "images")) == sorted(f"{i['id']}.png" for i in items)
    assert os.listdir(tmp_path / "run" / "eval") == ["step_000000004"]  # no staging folder left


class _Cut(Exception):
    pass


def test_a_stop_ends_the_evaluation_at_its_next_batch_and_writes_nothing(tmp_path, monkeypatch):
    """The stop point is called before each batch; what it raises ends the evaluation there: no
    more batches made, the model back in train mode, and the step's report as it was before (a
    step evaluated again after a resume keeps its whole earlier report, not half a new one)."""
    llm = _tiny_llm(str(tmp_path / "llm"))
    decoder = save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    model = _tiny_model(llm)
    model.train()
    cfg = EvalConfig(every=4, per_category=1, width=8, height=8, steps=1, batch=1)
    task = InLoopEval(cfg, decoder, str(tmp_path / "run"), seed=0, collective=False, writes=True)
    task.run(4, model, _go_on)
    report = tmp_path / "run" / "eval" / "step_000000004"
    before = {p: p.read_bytes() for p in report.rglob("*") if p.is_file()}
    made, calls = [], []
    batch_images = TrainedModel.batch_images
    monkeypatch.setattr(TrainedModel, "batch_images",
                        lambda self, k, *a: made.append(k) or batch_images(self, k, *a))

    def stop_at_third(together: bool) -> None:
        calls.append(together)
        if len(calls) == 3:
            raise _Cut

    with pytest.raises(_Cut):
        task.run(4, model, stop_at_third)
    assert calls == [True] * 3 and made == [0, 1]  # together: every rank decides at batch 2
    assert model.training
    assert os.listdir(report.parent) == ["step_000000004"]  # no staging folder left
    assert {p: p.read_bytes() for p in report.rglob("*") if p.is_file()} == before


PROMPTS = [item["prompt"] for item in load_suite()[:5]]  # 3 batches of 2: rank 1 idle in round 2
SAMPLING = SamplingConfig(num_steps=1, seed=3)


@rank_entry
def _sharing_rank(rank: int, world: int, port: int, tmp: str, sizes: list[int]) -> None:
    """shared_images of the first n PROMPTS for each n in `sizes`; records the batches this
    rank made and the largest buffer its collectives held (in images)."""
    loopback_gloo_group(rank, world, port)
    try:
        trained = TrainedModel(_tiny_model(os.path.join(tmp, "llm")),
                               load_tokenizer(os.path.join(tmp, "tok")))
        made, held, batch_images = [], [0], trained.batch_images
        trained.batch_images = lambda k, *a: made.append(k) or batch_images(k, *a)
        for name in ("all_gather", "broadcast"):  # what shared_images may send with
            def counting(out, *a, _send=getattr(tdist, name), **kw):
                held[0] = max(held[0], sum(t.shape[0] for t in out) if isinstance(out, list)
                              else out.shape[0])
                return _send(out, *a, **kw)
            setattr(tdist, name, counting)
        for n in sizes:
            images = shared_images(trained, PROMPTS[:n], 8, 8, SAMPLING, batch=2,
                                   before_batch=lambda: None)
            np.save(os.path.join(tmp, f"rank{rank}_{n}.npy"),
                    np.stack([np.asarray(i) for i in images]))
        with open(os.path.join(tmp, f"made{rank}.json"), "w") as f:
            json.dump({"made": made, "held": held[0]}, f)
    finally:
        tdist.destroy_process_group()


def _alone(tmp_path, n: int) -> np.ndarray:
    """The first n PROMPTS' images as one process makes them."""
    alone = TrainedModel(_tiny_model(str(tmp_path / "llm")), load_tokenizer(str(tmp_path / "tok"))
                         ).images(PROMPTS[:n], 8, 8, SAMPLING, batch=2, any_bucket=True,
                                  progress=False)
    return np.stack([np.asarray(i) for i in alone])


@pytest.mark.slow
def test_the_ranks_share_the_batches_and_make_what_one_process_makes(tmp_path):
    """Rank r makes batches r, r + W, ... (rank 0 made all of them while the others waited in
    their next collective, which a long evaluation could hold past the process group's
    timeout); every rank gets every image, and they are the images one process makes."""
    _tiny_llm(str(tmp_path / "llm"))
    save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    spawn_ranks(_sharing_rank, (2, free_port(), str(tmp_path), [5]), 2)
    got = [json.loads((tmp_path / f"made{r}.json").read_text()) for r in (0, 1)]
    assert [g["made"] for g in got] == [[0, 2], [1]]
    expected = _alone(tmp_path, 5)
    assert expected.shape == (5, 8, 8, 3) and len(np.unique(expected.reshape(5, -1), axis=0)) > 1
    for r in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}_5.npy"), expected)


@pytest.mark.slow
def test_three_ranks_share_fewer_batches_and_hold_one_batch_at_a_time(tmp_path):
    """One prompt (one batch for three ranks), then five (batches of 2, 2, 1): the same images
    as one process, in order, on every rank; a collective holds one batch of images, not one
    per rank (an all-gather held W batches, most of them padding for a suite of a few batches:
    at 1024 px, 3 MiB an image, batch 8 and 64 ranks, 1.5 GiB of device memory)."""
    _tiny_llm(str(tmp_path / "llm"))
    save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    spawn_ranks(_sharing_rank, (3, free_port(), str(tmp_path), [1, 5]), 3)
    got = [json.loads((tmp_path / f"made{r}.json").read_text()) for r in range(3)]
    assert [g["made"] for g in got] == [[0, 0], [1], [2]]
    for n in (1, 5):
        expected = _alone(tmp_path, n)
        for r in range(3):
            np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}_{n}.npy"), expected)
    assert max(g["held"] for g in got) == 2

PREVIEW_S, TIMEOUT_S = 5, 2  # rank 0's preview; the process group's timeout


@rank_entry
def _tasks_rank(rank: int, world: int, port: int, tmp: str) -> None:
    """A step where a preview and an evaluation are both due, run as the loop runs its tasks:
    each due one in turn, then the patient barrier."""
    import bdt.generation.preview as preview
    from bdt.train import in_loop_tasks
    from bdt.training.ar.config import TrainConfig
    from bdt.training.distributed import DistInfo
    from bdt.training.patient_barrier import open_patient_barriers, patient_barrier

    loopback_gloo_group(rank, world, port, timeout=timedelta(seconds=TIMEOUT_S))
    open_patient_barriers()
    try:
        cfg = TrainConfig(run_dir=os.path.join(tmp, "run"))
        cfg.data.tokenizer = os.path.join(tmp, "tok")
        cfg.logging.sample_every, cfg.logging.sample_hw, cfg.logging.sample_steps = 1, [2, 2], 1
        cfg.eval = EvalConfig(every=1, per_category=1, width=8, height=8, steps=1, batch=2)
        grid = preview.sample_grid
        preview.sample_grid = lambda *a: time.sleep(PREVIEW_S) or grid(*a)  # a long preview
        model = _tiny_model(os.path.join(tmp, "llm")).eval()
        metrics = {}
        for task in in_loop_tasks(cfg, DistInfo(rank, world, rank, torch.device("cpu"))):
            if task.due(1):
                metrics.update(task.run(1, model, _go_on))
        patient_barrier()
        with open(os.path.join(tmp, f"metrics{rank}.json"), "w") as f:
            json.dump(metrics, f)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_a_preview_rank_0_makes_alone_does_not_hold_the_shared_evaluation(tmp_path):
    """Under ZeRO 0-2 rank 0 makes the previews alone and the ranks meet after them in the
    patient barrier; a preview run before the shared evaluation kept the other ranks waiting
    in the evaluation's first all-gather instead, which ends at the process group's timeout."""
    _tiny_llm(str(tmp_path / "llm"))
    save_tiny_image_tokenizer(str(tmp_path / "tok"), bits=16)
    spawn_ranks(_tasks_rank, (2, free_port(), str(tmp_path)), 2)
    got = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["eval_overall"] == got[1]["eval_overall"] >= 0
    assert (tmp_path / "run" / "samples" / "step_000000001.png").exists()
    assert (tmp_path / "run" / "eval" / "step_000000001" / "eval.json").exists()
