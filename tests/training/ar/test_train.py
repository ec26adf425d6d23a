"""Training on 2 CPU ranks (gloo) with a tiny model: ZeRO-2/3, exact resume after SIGKILL, a kill
during checkpoint writing, SIGTERM, a stage transition, S3 checkpoints.

Each launch costs mostly imports (transformers, DeepSpeed): the interruptions share one chain
of restarts so the file stays within its time budget."""

import glob
import json
import os
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from testkit import TINY_CONFIG
from trainutil import (export_tensors, read_metrics, spawn_train, tiny_image_tokenizer, tiny_llm,
                       train_overrides, write_shards)

pytestmark = pytest.mark.slow

STEPS = [4, 4]  # two stages; the transition is at step 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    llm = tiny_llm(str(root / "llm"))
    s0 = write_shards(str(root / "s0"), [(4, 4), (4, 8), (8, 4)], num_shards=2, per_shard=10,
                      factor=2)
    s1 = write_shards(str(root / "s1"), [(8, 8), (4, 8)], num_shards=2, per_shard=8, seed=1, factor=2)
    return {"root": root, "llm": llm, "shards": [os.path.dirname(s0[0]), os.path.dirname(s1[0])]}


def argv(data, run_dir, *extra, zero=2, precision="fp32", steps=STEPS, shards=None):
    return ["--config", TINY_CONFIG, *train_overrides(str(run_dir), data["llm"], shards or data["shards"],
                                                 steps=steps, zero=zero, precision=precision,
                                                 every=2, extra=extra)]


@pytest.fixture(scope="module")
def ref(data):
    run_dir = data["root"] / "ref"
    assert spawn_train(argv(data, run_dir, "logging.sample_keys=true")) == 0
    return {"dir": run_dir, "metrics": read_metrics(str(run_dir)),
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "params": export_tensors(str(run_dir))}


def assert_same_as_ref(ref, run_dir, from_step):
    got = read_metrics(str(run_dir))
    total = sum(STEPS)
    assert sorted(got)[-1] == total
    for step in range(from_step + 1, total + 1):
        for key in ("loss", "text_ce", "vision", "bit_accuracy", "grad_norm", "lr"):
            assert got[step][key] == ref["metrics"][step][key], (step, key)
    # the stream neither skipped nor re-read samples across the restart
    assert got[total]["data/samples_read"] == ref["metrics"][total]["data/samples_read"]
    params = export_tensors(str(run_dir))
    assert params.keys() == ref["params"].keys()
    for k, v in params.items():
        assert torch.equal(v, ref["params"][k]), k


def test_zero2_two_ranks_learn_and_agree(ref):
    m, s = ref["metrics"], ref["summary"]
    # The shards' image bits are random: the vision loss has nothing to learn and swings with
    # each micro-batch's flow times (2.4-3.5 over these steps); the captions repeat, so the
    # text loss must fall.
    text = [m[i]["text_ce"] for i in sorted(m)]
    assert text[-1] < text[0] and sum(text[-2:]) < sum(text[:2])
    assert len(s["param_digests"]) == 2 and len(set(s["param_digests"])) == 1
    assert s["step"] == sum(STEPS) and not s["stopped"]
    complete = sorted(p.name for p in (ref["dir"] / "checkpoints").iterdir()
                      if (p / "COMPLETE").exists())
    assert complete == ["step_000000006", "step_000000008"]  # keep_last = 2


def test_crash_chain_resumes_exactly(data, ref, tmp_path):
    """One run interrupted three times (a kill, a signal, a time limit), each restart resuming
    from the newest complete checkpoint; the end result must be the uninterrupted run's,
    bitwise."""
    def logged(*extra):  # every consumed sample key per rank, as the reference run logs them
        return argv(data, tmp_path, "logging.sample_keys=true", *extra)

    ck = tmp_path / "checkpoints"
    # 1. SIGKILL while writing the checkpoint of step 4 (engine files written, no marker yet)
    assert spawn_train(logged("fault.kill_during_checkpoint=4")) == -9
    assert (ck / "step_000000002" / "COMPLETE").exists()
    assert (ck / "step_000000004").is_dir() and not (ck / "step_000000004" / "COMPLETE").exists()
    assert not (tmp_path / "summary.json").exists()
    # 2. the incomplete step 4 is ignored: resume at 2 (stage 0), cross the stage transition
    #    at 4; only rank 0 gets SIGTERM after step 5, the all-reduced flag stops both ranks
    #    there, they save and exit 0; the evaluation due at step 5 runs after the save (the
    #    grace period goes to the checkpoint) and changes nothing the resumed run trains
    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    assert spawn_train(logged("fault.sigterm_at_step=5", f"data.tokenizer={tok}", "eval.every=5",
                              "eval.per_category=1", "eval.width=8", "eval.height=8",
                              "eval.steps=2")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] and summary["step"] == 5 and summary["saved_step"] == 5
    saved = json.loads((ck / "step_000000005" / "COMPLETE").read_text())
    evaluated = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval_overall" in line]
    assert [r["step"] for r in evaluated] == [5] and evaluated[0]["time"] > saved["time"]
    assert not (tmp_path / "export").exists()  # preempted: no export
    # 3. resume at 5 with a time limit already spent after one step: both ranks finish early
    #    at step 6 (one collective decides), save and export
    #    (data.tokenizer named again: a resume that drops the run's image tokenizer is refused)
    assert spawn_train(logged("time_limit_min=1e-6", f"data.tokenizer={tok}")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timed_out"] and not summary["stopped"] and summary["saved_step"] == 6
    assert (ck / "step_000000006" / "COMPLETE").exists()
    assert (tmp_path / "export" / "model_config.yaml").exists()
    # 4. resume at 6, inside stage 1 with its stream state, and finish; the shards are named
    #    otherwise (through a link, with a '..'): the same files, so the same stream
    s0, s1 = data["shards"]
    os.symlink(s1, tmp_path / "s1_link")
    renamed = [os.path.join(s0, "..", os.path.basename(s0)), str(tmp_path / "s1_link")]
    assert spawn_train(argv(data, tmp_path, "logging.sample_keys=true", f"data.tokenizer={tok}",
                            shards=renamed)) == 0
    resumed = [json.loads(line)["resumed_from_step"] for line in open(tmp_path / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert resumed == [2, 5, 6]
    assert_same_as_ref(ref, tmp_path, from_step=2)
    # The log reads like the uninterrupted run's: steps 3-4, logged before the first kill and
    # again after the resume at 2, appear once; only the timings differ.
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    trained = [untimed(r) for r in records if "loss" in r]
    assert trained == [untimed(ref["metrics"][step]) for step in sorted(ref["metrics"])]
    assert sum("params" in r for r in records) == 1  # logged by the fresh start only
    assert stage_records(tmp_path) == stage_records(ref["dir"]) == [(0, 0), (4, 1)]
    # each rank's consumed keys: the steps trained twice (3-4) are recorded once
    for rank in range(2):
        name = f"sample_keys/rank_{rank:05d}.jsonl"
        assert (tmp_path / name).read_text() == (ref["dir"] / name).read_text(), name
    # 5. a rerun of the finished run resumes at its last step and runs none: its summary kept
    #    the stream's counts (once "stream": {}, as after a kill between COMPLETE and export)
    assert spawn_train(logged(f"data.tokenizer={tok}")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stream"] == ref["summary"]["stream"] and summary["stream"]["batches"] > 0
    assert summary["stream_all_ranks"] == ref["summary"]["stream_all_ranks"]


def stage_records(run_dir) -> list[tuple[int, int]]:
    """(step, stage) of each stage switch metrics.jsonl records."""
    return [(r["step"], int(r["stage"])) for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if "stage" in r]


def test_a_resume_from_the_stage_boundary_logs_the_switch_once(data, ref, tmp_path):
    """Killed while saving step 6, after the boundary checkpoint of step 4 and the switch to
    stage 1: the resume from 4 keeps the switch the killed run logged and adds none (it logged
    it a second time), so the log holds what the uninterrupted run's does, timings aside."""
    assert spawn_train(argv(data, tmp_path, "fault.kill_during_checkpoint=6")) == -9
    assert stage_records(tmp_path) == [(0, 0), (4, 1)]
    assert spawn_train(argv(data, tmp_path)) == 0
    records = [untimed(r) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
               if "resumed_from_step" not in r]
    assert records == [untimed(r) for r in map(json.loads, open(ref["dir"] / "metrics.jsonl"))]


def test_a_stop_inside_a_log_window_logs_as_if_uninterrupted(data, ref, tmp_path):
    """Logging every 3 steps, stopped by a signal at step 5: the window 4-5 is logged as partial
    and saved with the checkpoint; the resumed run logs 4-6 whole, as an uninterrupted run does
    (once a record at 5 and one for step 6 alone)."""
    assert spawn_train(argv(data, tmp_path, "logging.every=3", "fault.sigterm_at_step=5")) == 0
    assert [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if r.get("window_partial")] == [5]
    assert spawn_train(argv(data, tmp_path, "logging.every=3")) == 0
    logged = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r}
    assert sorted(logged) == [3, 6, 8] and not any("window_partial" in r for r in logged.values())
    for step, first in ((3, 1), (6, 4), (8, 7)):  # the per-step means of the reference run
        for key in ("loss", "vision", "bit_accuracy"):
            expected = sum(ref["metrics"][i][key] for i in range(first, step + 1)) / (step - first + 1)
            assert logged[step][key] == pytest.approx(expected, rel=1e-6), (step, key)
        assert logged[step]["lr"] == ref["metrics"][step]["lr"]


def test_a_resume_over_other_shards_is_refused_naming_the_stage(data, tmp_path, capfd):
    """Stopped in stage 0, resumed with stage 0's shards cut to one: refused before any step,
    naming the stage and its shards (once a bare "different shards" from inside the stream, after
    the resume was logged), and recorded as a launch error the resume wrapper does not retry.
    The run's config.yaml, which sampling its checkpoints rebuilds from, is still the one they
    were trained with (the refused config once replaced it)."""
    assert spawn_train(argv(data, tmp_path, "fault.sigterm_at_step=2")) == 0
    one = sorted(glob.glob(os.path.join(data["shards"][0], "*.tar")))[0]
    assert spawn_train(argv(data, tmp_path, shards=[one, data["shards"][1]])) == 2
    err = capfd.readouterr().err
    assert f"error: stages.0 ('s0'): the checkpoint's data stream was read from other shards " \
           f"than the 1 that its shards '{one}' name now" in err, err
    assert json.loads((tmp_path / "launch_error.json").read_text())["errors"][0]["types"][0] == \
        "ValueError"
    assert not any("resumed_from_step" in r for r in map(json.loads, open(tmp_path / "metrics.jsonl")))
    assert OmegaConf.load(tmp_path / "config.yaml").stages[0].shards == data["shards"][0]


def test_a_diverging_run_stops_both_ranks_before_saving_the_bad_step(data, tmp_path, capfd):
    # Stage 1 at an absurd LR: its first update (step 5) blows the weights up, and the loss of
    # step 6 is NaN on both ranks. Without the guard the run went on to step 8, saving NaN
    # steps over the good ones, and exported.
    assert spawn_train(argv(data, tmp_path, "stages.1.lr=1e30", "checkpoint.every=1")) == 1
    err = capfd.readouterr().err
    assert "error: training diverged at step 6: non-finite values (rank 0: micro-batch 0 of stage " \
           "s1: loss=nan" in err and "; rank 1: micro-batch 0 of stage s1: loss=nan" in err
    assert "the newest checkpoint is step 5. Lower the learning rate (stages.1.lr)" in err
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000000004", "step_000000005"]
    assert all((ck / name / "COMPLETE").exists() for name in ("step_000000004", "step_000000005"))
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "export").exists()
    metrics = read_metrics(str(tmp_path))
    assert max(metrics) == 6 and metrics[6]["loss"] != metrics[6]["loss"]  # logged: NaN


TIMINGS = ("time", "step_time_s", "last_step_s", "mfu", "data_wait_frac", "tokens_per_s",
           "images_per_s", "tokens_per_s_rank", "images_per_s_rank")


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMINGS}


def test_s3_checkpoints_resume(data, ref, tmp_path, s3_bucket, flaky_s3):
    """The reference run's complete step-6 checkpoint, uploaded to the S3 server with its owner
    record, is picked up by another run dir that adopts it (checkpoint.adopt) and whose
    checkpoint.dir is that bucket; it finishes exactly as the reference did and saves its own
    checkpoints (marker last) there. The server answers a tenth of the requests as a loaded S3
    does (503 SlowDown, 500, an answer cut off): retried, they change nothing."""
    import fsspec

    from bdt.training.checkpoint_owner import OWNER_NAME, run_id

    flaky_s3.rate, flaky_s3.kinds = 0.1, ("slowdown", "internal", "cut")

    ck = f"{s3_bucket}/run/ck"
    fs = fsspec.filesystem("s3")
    local = ref["dir"] / "checkpoints"
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local).as_posix()
        if path.is_file() and (rel.startswith("step_000000006/") or "/" not in rel):
            fs.put_file(str(path), f"{ck}/{rel}")
    assert fs.exists(f"{ck}/{OWNER_NAME}")
    assert spawn_train(argv(data, tmp_path, f"checkpoint.dir={ck}",
                            f"checkpoint.staging_dir={tmp_path / 'staging'}",
                            f"checkpoint.adopt={run_id(str(ref['dir']))}")) == 0
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{ck}/{OWNER_NAME}"))["run_id"] == run_id(str(tmp_path))
    assert fs.exists(f"{ck}/step_000000008/COMPLETE")
    assert fs.exists(f"{ck}/step_000000008/rank_00001.json")
    assert not (tmp_path / "checkpoints").exists()  # nothing went to the local run dir
    resumed = [json.loads(line)["resumed_from_step"] for line in open(tmp_path / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert resumed == [6]
    assert_same_as_ref(ref, tmp_path, from_step=6)
    assert sum(flaky_s3.injected.values()) >= 3, flaky_s3.injected


def test_zero3_partitioned_at_load_matches_zero2(data, ref, tmp_path):
    """The reference run under ZeRO-3: each rank holds half the model from the build on, and
    training follows the ZeRO-2 run (same seed) up to float reduction order."""
    assert spawn_train(argv(data, tmp_path, zero=3)) == 0
    start = next(json.loads(line) for line in open(tmp_path / "metrics.jsonl")
                 if "params" in line)
    held = [start["params_local/rank0"], start["params_local/rank1"]]
    num_tensors = len(ref["params"])
    assert all(start["params"] / 2 <= n <= start["params"] / 2 + num_tensors for n in held)
    m = read_metrics(str(tmp_path))
    for step in range(1, sum(STEPS) + 1):
        assert m[step]["loss"] == pytest.approx(ref["metrics"][step]["loss"], rel=1e-5), step
    exported = export_tensors(str(tmp_path))
    assert exported.keys() == ref["params"].keys()
    for k, v in exported.items():
        torch.testing.assert_close(v, ref["params"][k], rtol=0, atol=1e-4)


def test_zero3_bf16_two_ranks(data, tmp_path):
    # with activation checkpointing of the decoder layers and the head (non-reentrant), and an
    # in-loop evaluation, whose generation needs both ranks under ZeRO-3
    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    assert spawn_train(argv(data, tmp_path, "model.activation_checkpointing=true",
                            f"data.tokenizer={tok}", "eval.every=6", "eval.per_category=1",
                            "eval.width=8", "eval.height=8", "eval.steps=2", zero=3,
                            precision="bf16", steps=[6], shards=[data["shards"][0]])) == 0
    report = json.loads((tmp_path / "eval" / "step_000000006" / "eval.json").read_text())
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval_overall" in line]
    assert len(logged) == 1 and logged[0]["eval_overall"] == report["overall"]
    assert report["num_images"] == len(report["per_category"])
    m = read_metrics(str(tmp_path))
    assert m[5]["text_ce"] + m[6]["text_ce"] < m[1]["text_ce"] + m[2]["text_ce"]  # see above
    digests = json.loads((tmp_path / "summary.json").read_text())["param_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1
    # the export is a loadable model for sampling, holding the consolidated ZeRO-3 weights
    from bdt.model.ar import BitDanceModel

    exported = export_tensors(str(tmp_path))
    assert exported["lm_head.weight"].dtype == torch.bfloat16
    model = BitDanceModel.from_pretrained(str(tmp_path / "export"))
    state = model.state_dict()
    for key in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "head.final_proj.weight"):
        ours = state[key if key.startswith("head.") else "llm." + key]
        assert ours.abs().sum() > 0 and torch.equal(ours, exported[key].float())


def test_token_stage_at_smaller_p_ends_on_real_tokens_across_a_resume(data, tmp_path):
    """Stage 0 trains P = 1 (the model's is 4) until 1500 real tokens (all ranks) are seen;
    stage 1 trains P = 4 for 2 steps. A SIGTERM inside stage 0 and the resume keep its count.
    Rows come from a prefetch worker process: stopped at the SIGTERM and at the stage switch."""
    budget = 1500
    overrides = (f"stages=[{{name: p1, shards: '{data['shards'][0]}', tokens: {budget}, "
                 f"parallel_num: 1, token_budget: 160, lr: 3e-3, warmup_steps: 1}}, "
                 f"{{name: p4, shards: '{data['shards'][1]}', steps: 2, token_budget: 160, "
                 f"lr: 1e-3, warmup_steps: 1}}]", "data.prefetch_worker=process")
    assert spawn_train(argv(data, tmp_path, *overrides, "fault.sigterm_at_step=2")) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["saved_step"] == 2
    assert spawn_train(argv(data, tmp_path, *overrides)) == 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [2]
    switch = [r["step"] for r in records if r.get("stage") == 1]
    m = read_metrics(str(tmp_path))
    assert len(switch) == 1 and switch[0] > 2  # the run was stopped inside the token stage
    k = switch[0]
    # tokens_seen is the global count: stage 0 ended with the first step that reached the budget
    assert m[k - 1]["tokens_seen"] < budget <= m[k]["tokens_seen"]
    assert sorted(m)[-1] == k + 2 and all(m[s]["loss"] < 10 for s in m)


def test_ema_leaves_training_alone_resumes_and_is_exported(data, ref, tmp_path):
    """With ema_decay the run trains exactly as without (same losses), a resume after SIGKILL
    restores the average too (the export equals an uninterrupted EMA run's), and the export
    holds the averaged weights, not the live ones."""
    once, chain = tmp_path / "once", tmp_path / "chain"
    assert spawn_train(argv(data, once, "ema_decay=0.9")) == 0
    got = read_metrics(str(once))
    assert all(got[s]["loss"] == ref["metrics"][s]["loss"] for s in ref["metrics"])
    averaged = export_tensors(str(once))
    changed = [k for k, v in averaged.items() if not torch.equal(v, ref["params"][k])]
    assert len(changed) > len(averaged) // 2, "the export should hold the EMA weights"
    assert spawn_train(argv(data, chain, "ema_decay=0.9", "fault.kill_after_checkpoint=4")) == -9
    assert spawn_train(argv(data, chain, "ema_decay=0.9")) == 0
    resumed = export_tensors(str(chain))
    assert all(torch.equal(resumed[k], v) for k, v in averaged.items())


def test_a_tied_embedding_is_averaged_under_both_names(data, tmp_path):
    """Qwen3's small models tie lm_head to the input embedding: the EMA kept it under one name,
    so a checkpoint sampled as the run's model (run_weights) had the averaged embedding beside a
    live output projection."""
    from bdt.generation.run_weights import checkpoint_weights

    llm = tmp_path / "llm"
    shutil.copytree(data["llm"], llm)
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    run_dir = tmp_path / "run"
    assert spawn_train(["--config", TINY_CONFIG, *train_overrides(
        str(run_dir), str(llm), data["shards"][0], steps=3, extra=["ema_decay=0.9"])], world=1) == 0
    ck = run_dir / "checkpoints" / "step_000000003"
    shadow = torch.load(ck / "shared.pt", weights_only=True)["ema"]["shadow"]
    weights = checkpoint_weights(str(ck))
    names = [k for k in weights if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    averaged = shadow[next(k for k in names if k.endswith("embed_tokens.weight"))]
    assert len(names) == 2 and all(torch.equal(weights[k], averaged) for k in names), names
    exported = export_tensors(str(run_dir))  # the tied output projection is saved once
    assert torch.equal(exported["model.embed_tokens.weight"], averaged)


def test_a_resume_that_turns_the_ema_off_says_so_and_on_is_refused(data, tmp_path, capfd):
    """ema_decay x -> 0 drops the average (the export becomes the live weights): logged, not
    silent; 0 -> x has no average to continue: refused before a step, naming the checkpoint."""
    run_dir, one = tmp_path / "run", data["shards"][:1]
    assert spawn_train(argv(data, run_dir, "ema_decay=0.9", steps=[2], shards=one)) == 0
    capfd.readouterr()
    assert spawn_train(argv(data, run_dir, "ema_decay=0", steps=[4], shards=one)) == 0
    assert re.search(r"step_000000002 holds EMA weights that ema_decay=0 drops",
                     capfd.readouterr().err)
    assert spawn_train(argv(data, run_dir, "ema_decay=0.9", steps=[6], shards=one)) != 0
    assert re.search(r"step_000000004 holds no EMA weights but ema_decay=0.9",
                     capfd.readouterr().err)


def test_compiled_blocks_train_exactly_as_eager(data, ref, tmp_path):
    """compile.enabled, traced with aot_eager (no code generation on 2 cores): every step's
    losses and the export are the eager run's, bitwise; the export is written eager."""
    run_dir = tmp_path / "compiled"
    assert spawn_train(argv(data, run_dir, "compile.enabled=true",
                            "compile.backend=aot_eager")) == 0
    assert_same_as_ref(ref, run_dir, 0)


def test_time_limit_fit_ends_the_decay_in_time_and_survives_a_resume(data, tmp_path):
    """A stage far too long for a 30 s limit: after 60 steps of it the run shortens it to what
    0.15 of the time left allows, so its cosine reaches the floor at the end instead of being cut
    by the limit. A SIGTERM after the decision and the resume keep it (no second measurement)."""
    from bdt.training.ar.time_fit import CALIBRATION_STEPS, WARMUP_STEPS

    fit_at = STEPS[0] + WARMUP_STEPS + CALIBRATION_STEPS
    overrides = train_overrides(str(tmp_path), data["llm"], data["shards"], steps=[STEPS[0], 100000],
                                every=100000, extra=["time_limit_min=0.5", "time_limit_fit=0.15"])
    argv_fit = ["--config", TINY_CONFIG, *overrides]
    assert spawn_train(argv_fit + [f"fault.sigterm_at_step={fit_at + 2}"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["saved_step"] == fit_at + 2
    assert spawn_train(argv_fit) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    [fit] = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "time_fit/step_s" in line]
    assert fit["step"] == fit_at and fit["time_fit/shortened"] == 1.0
    end = fit_at + fit["time_fit/steps_left"]
    assert fit["time_fit/stage_steps"] == end - STEPS[0] < 100000
    assert summary["step"] == end and not summary["timed_out"] and not summary["stopped"]
    m = read_metrics(str(tmp_path))
    assert m[end]["lr"] == pytest.approx(3e-3 * 0.1, rel=0.02)  # the cosine's floor: decay done
    assert m[fit_at]["lr"] > 0.9 * 3e-3


def test_checkpoint_at_end_off_ends_a_timed_out_run_without_saving(data, tmp_path):
    """scripts/gpu_check.sh's 1.2B throughput run ends at its time limit: its final save (~17 GB
    of ZeRO-2 state, tens of seconds) ran past the stage's limit after the metrics were logged.
    With checkpoint.at_end=false the run logs, exports and exits with no checkpoint written."""
    assert spawn_train(argv(data, tmp_path, "time_limit_min=1e-6", "checkpoint.every=100000",
                            "checkpoint.at_end=false"), world=1) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timed_out"] and summary["step"] == 1 and summary["saved_step"] == -1
    assert not glob.glob(str(tmp_path / "checkpoints" / "step_*"))
    assert 1 in read_metrics(str(tmp_path))
    assert (tmp_path / "export" / "model_config.yaml").exists()


def test_a_resumed_run_takes_its_stage_lengths_from_the_config(data, tmp_path):
    """A run stopped inside its last stage, past its warmup, and resumed with that stage
    lengthened and another LR trains to the new end, its cosine spread over the new length at
    the new LR from the first resumed step on (the checkpoint holds the position only; DeepSpeed
    restores the optimizer's saved LR, which the trainer replaces)."""
    from bdt.training.schedule import WarmupSchedule

    assert spawn_train(argv(data, tmp_path, "fault.sigterm_at_step=7")) == 0
    assert spawn_train(argv(data, tmp_path, "stages.1.lr=5e-3", steps=[4, 6])) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 10
    m = read_metrics(str(tmp_path))
    # stage 1 begins after step 4: step s runs at position s - 5 of its schedule
    before, after = WarmupSchedule(2, 4, "cosine", 0.1), WarmupSchedule(2, 6, "cosine", 0.1)
    assert [m[s]["lr"] for s in range(5, 8)] == [3e-3 * before(s - 5) for s in range(5, 8)]
    assert [m[s]["lr"] for s in range(8, 11)] == [5e-3 * after(s - 5) for s in range(8, 11)]


def test_a_resume_at_the_stage_switch_trains_a_lengthened_stage_on(data, tmp_path):
    """Stopped at step 4, the last of stage 0 (the checkpoint holds stage 0's stream and the
    clock already in stage 1), resumed with stage 0 lengthened to 6: stage 0 trains on, reading
    its stream where it stopped, and the log records the switch moved to step 6."""
    assert spawn_train(argv(data, tmp_path, "fault.sigterm_at_step=4")) == 0
    assert spawn_train(argv(data, tmp_path, steps=[6, 4])) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 10
    assert stage_records(tmp_path) == [(0, 0), (4, 1), (4, 0), (6, 1)]
    m = read_metrics(str(tmp_path))
    read = [m[s]["data/samples_read"] for s in range(1, 8)]
    assert read == sorted(read[:6]) + [read[6]] and read[6] < read[5]  # stage 1's stream: at 7
