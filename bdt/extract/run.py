"""Driver of the extraction job: plan, fan units out to the actor pool, account, write the manifest.

Call `run(cfg)` with Ray already initialised (pipelines/extract_tokens.py does that). The plan is
deterministic: input unit i (tar shard i of the expanded input list, or the i-th chunk of a
folder) becomes shard i of every stage family, recorded in plan.json and checked on reruns.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, deque
from typing import Any

from bdt import output_dirs, storage
from bdt.config import save_resolved, to_dict
from bdt.data.buckets import check_buckets, make_buckets
from bdt.data.images import DECODE_VERSION
from bdt.extract.input_units import InputUnit, list_units, refuse_output_inside
from bdt.extract import manifest as mf
from bdt.extract.config import ExtractConfig, encode_dtype, stage_name, validate

_IN_FLIGHT_PER_ACTOR = 2  # one running + one queued, so an actor never idles between units


def resolve_stages(cfg: ExtractConfig, downsample_factor: int) -> dict[str, list[list[int]]]:
    """{stage name: [[W, H], ...]}: explicit bucket lists checked, presets generated."""
    multiple = downsample_factor * cfg.patch_size
    out: dict[str, list[list[int]]] = {}
    for i, stage in enumerate(cfg.stages):
        name = stage_name(stage)
        if name in out or not name or "/" in name:
            raise ValueError(f"stages[{i}]: name '{name}' must be unique and contain no '/'")
        try:
            buckets = (check_buckets(stage.buckets, multiple) if stage.buckets
                       else make_buckets(stage.resolution, multiple, stage.bucket_preset or None))
        except ValueError as exc:
            raise ValueError(f"stages[{i}] ({name}): {exc}") from None
        out[name] = [list(b) for b in buckets]
    if not out:
        raise ValueError("stages: at least one stage resolution is needed")
    return out


def _token_geometry(tokenizer: str) -> dict[str, int]:
    from bdt.tokenizer.config import TokenizerConfig
    from bdt.tokenizer.io import resolve_files  # load_tokenizer's rule (also ae_config.json)

    fs, path = storage.filesystem(tokenizer)
    if fs.isfile(path):
        # The manifest identifies the tokenizer by every file of its directory (tokenizer_identity).
        raise ValueError(f"tokenizer: {tokenizer} is a file; give the directory holding it and its "
                         f"config (config.json + model.safetensors, or the release's ae.safetensors + "
                         f"ae_config.json)")
    config_url = resolve_files(tokenizer, need_config=True)[1]
    config = mf.read_json(config_url)
    if config is None:
        raise FileNotFoundError(f"tokenizer: {config_url} is not readable JSON")
    tc = TokenizerConfig.from_dict(config)
    return {"downsample_factor": tc.downsample_factor, "bits_per_token": tc.bits_per_token}


def plan(cfg: ExtractConfig) -> tuple[list[InputUnit], dict[str, list[list[int]]], dict, str]:
    """(units, stage buckets, tokenizer identity, fingerprint); writes plan.json + config.yaml."""
    import torch

    from bdt.tokenizer.io import check_tokenizer, tokenizer_identity

    validate(cfg)
    # The trainer refuses it (its export copies the folder): refused before the shards, not after.
    output_dirs.check_links(cfg.tokenizer, "tokenizer")
    geometry = _token_geometry(cfg.tokenizer)
    # Weights that do not fit the config would fail every actor's start, after Ray started.
    check_tokenizer(cfg.tokenizer, getattr(torch, encode_dtype(cfg)))
    stages = resolve_stages(cfg, geometry["downsample_factor"])
    units = list_units(cfg.inputs, cfg.input_format, cfg.folder_shard_size, list(cfg.image_extensions))
    refuse_output_inside(units, cfg.output)
    storage.check_writable(cfg.output)
    mf.remove_stale_root_temps(cfg.output)  # a killed run's half-written files
    identity = dict(tokenizer_identity(cfg.tokenizer), **geometry)
    # Everything that changes a shard's content; not the Ray sizing or the paths.
    fp = mf.fingerprint({"tokenizer": identity["sha256"], "decode_version": DECODE_VERSION,
                         "stages": stages, "patch_size": cfg.patch_size,
                         "dtype": encode_dtype(cfg), "batch_size": cfg.batch_size,
                         "filters": [cfg.min_side, cfg.max_pixels, cfg.max_image_bytes, cfg.max_caption_bytes,
                                     list(cfg.image_extensions)]})
    mf.check_markers(cfg.output, fp, units)
    mf.check_plan(cfg.output, [u.plan_entry() for u in units])
    save_resolved(cfg, cfg.output)
    return units, stages, identity, fp


def _actor_capacity(cfg: ExtractConfig) -> int:
    """How many actors the cluster's live nodes can host at once: an actor's CPUs and GPUs must
    all come from one node, so capacity is counted per node, not from the cluster's totals."""
    import ray

    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = int(have.get("CPU", 0) // cfg.cpus_per_actor)
        if cfg.gpus_per_actor > 0:
            fits = min(fits, int(have.get("GPU", 0) // cfg.gpus_per_actor))
        total += fits
    return total


def _make_actors(cfg: ExtractConfig, fp: str, stages: dict[str, list[list[int]]], num_units: int) -> list[Any]:
    import ray

    from bdt.extract.worker import ShardEncoder

    capacity = _actor_capacity(cfg)
    # An actor without a unit would only load the tokenizer: capped before the check, so a
    # 3-unit job asking 8 actors runs on a cluster that hosts 3.
    n = min(cfg.num_actors or capacity, num_units)
    if capacity < max(n, 1):
        # Ray would queue actors it can never place and the units bound to them would wait forever.
        resources = ray.cluster_resources()
        asked = f" ({cfg.num_actors} asked, {num_units} unit(s))" if n < cfg.num_actors else ""
        raise ValueError(f"num_actors: {max(n, 1)} actor(s){asked} with cpus_per_actor={cfg.cpus_per_actor}, "
                         f"gpus_per_actor={cfg.gpus_per_actor} needed, the Ray cluster "
                         f"({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) can host "
                         f"{capacity}: lower num_actors or the per-actor resources")
    remote_cls = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
                            max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries,
                            concurrency_groups={"progress": 1})(ShardEncoder)
    cfg_dict = to_dict(cfg)
    return [remote_cls.remote(cfg_dict, fp, stages) for _ in range(n)]


class _Progress:
    """One tqdm bar over shards, its postfix counting inside the shards being written too.

    Actors answer `progress()` in their own concurrency group (a second thread), so a poll never
    waits for a shard to finish. Finished units count from their markers; live ones from the
    latest poll (an actor restarted mid-shard starts its count again, nothing is counted twice).
    """

    _POLL_TIMEOUT_S = 5.0  # a busy or restarting actor is left out of this poll, not waited for

    def __init__(self, total: int, interval_s: float):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="shard", desc="extract", mininterval=interval_s, file=sys.stderr)
        self.t0 = time.time()
        self.written = self.rejected = self.failed = 0  # finished units: new samples, all rejects
        self.live: dict[int, tuple[int, int]] = {}  # unit index -> (inputs, rejected) so far

    def unit_done(self, index: int, result: dict | None) -> None:
        self.live.pop(index, None)
        if result is None:
            self.failed += 1
        else:
            first = next(iter(result["stages"].values()))
            self.written += 0 if result["skipped"] else first["samples"]
            self.rejected += first["rejected"]
        self.bar.update(1)
        self._show()

    def poll(self, actors: list[Any]) -> None:
        import ray

        refs = [a.progress.options(concurrency_group="progress").remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._POLL_TIMEOUT_S)
        live = {}
        for ref in ready:
            try:
                state = ray.get(ref)
            except ray.exceptions.RayError:  # died meanwhile: the unit's result will say so
                continue
            if state is not None:
                live[state[0]] = (state[1], state[2])
        self.live = live
        self._show()

    def _show(self) -> None:
        images = self.written + sum(n - r for n, r in self.live.values())
        elapsed = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(images=images, img_per_s=f"{images / elapsed:.1f}",
                             rejects=self.rejected + sum(r for _, r in self.live.values()), failed=self.failed)

    def close(self) -> None:
        self.bar.close()


def run(cfg: ExtractConfig, planned: tuple | None = None) -> dict[str, Any]:
    """Extract every unit not already done; returns the summary (also in index.json). `planned`:
    what `plan(cfg)` returned, for a caller that holds `mf.output_lock` and checked the inputs
    before starting Ray."""
    if planned is not None:
        return _run(cfg, planned)
    with mf.output_lock(cfg.output):
        return _run(cfg, plan(cfg))


def _run(cfg: ExtractConfig, planned: tuple) -> dict[str, Any]:
    import ray

    t0 = time.time()
    units, stages, identity, fp = planned
    actors = _make_actors(cfg, fp, stages, len(units))
    # Units go only to actors that have started: one Ray cannot place yet (resources held by
    # other jobs) would otherwise hold its units until it starts, maybe never.
    starting = {a.progress.options(concurrency_group="progress").remote(): a for a in actors}
    started: list[Any] = []
    waited = False  # the note on actors not started yet is printed once
    death = ""  # why the last actor that failed to start did, for the units left without one
    todo = deque(units)
    in_flight: dict[Any, tuple[InputUnit, Any]] = {}
    # Per unit only its stages' markers (what index.json lists); rejects stay in their files.
    results: dict[int, dict] = {}
    failed: dict[int, str] = {}
    progress = _Progress(len(units), cfg.progress_interval_s)
    while todo or in_flight:
        for actor in started:
            while todo and sum(a is actor for _, a in in_flight.values()) < _IN_FLIGHT_PER_ACTOR:
                unit = todo.popleft()
                in_flight[actor.process.remote(unit.to_dict())] = (unit, actor)
        if not in_flight and not starting:  # every actor is gone
            failed.update({u.index: f"no live actor left{death}" for u in todo})
            break
        ready, _ = ray.wait(list(in_flight) + (list(starting) if todo else []), num_returns=1,
                            timeout=cfg.progress_interval_s)
        if not ready:
            if not started and not waited:
                waited = True
                print(f"extract: waiting for the Ray cluster to start an actor (0 of {len(actors)} "
                      f"started; its resources may be held by other jobs)", file=sys.stderr)
            progress.poll(started)
            continue
        if ready[0] in starting:
            actor = starting.pop(ready[0])
            try:
                ray.get(ready[0])
                started.append(actor)
            except ray.exceptions.RayActorError as exc:  # its constructor failed
                actors = [a for a in actors if a is not actor]
                death = f" (an actor failed to start: {str(exc).strip().splitlines()[-1][:300]})"
            continue
        unit, actor = in_flight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            failed[unit.index] = f"actor died after {cfg.max_retries} restarts: {str(exc).splitlines()[0]}"
            actors = [a for a in actors if a is not actor]
            started = [a for a in started if a is not actor]
            result = None
        except ray.exceptions.RayTaskError as exc:
            failed[unit.index] = str(exc).strip().splitlines()[-1][:300]
            result = None
        else:
            results[unit.index] = {"skipped": result["skipped"], "stages": result["stages"]}
        progress.unit_done(unit.index, result)
    progress.close()
    for actor in actors:
        ray.kill(actor)
    return _finish(cfg, units, stages, identity, results, failed, time.time() - t0, progress.written)


def _finish(cfg: ExtractConfig, units: list[InputUnit], stages: dict[str, list[list[int]]],
            identity: dict, results: dict[int, dict], failed: dict[int, str], seconds: float,
            new_samples: int) -> dict[str, Any]:
    root = cfg.output
    markers = {s: [r["stages"][s] for r in results.values()] for s in stages}
    # Merge the per-unit rejects (also those of units skipped as done) into one file, line by
    # line: a unit's file alone can be most of a GB (millions of rejects).
    reasons: Counter = Counter()
    with storage.open_atomic(storage.join(root, mf.REJECTS_NAME)) as merged:
        for index in sorted(results):
            if next(iter(results[index]["stages"].values()))["rejected"]:
                lines = storage.read_lines(mf.rejects_url(root, index), "merging")
                for number, line in enumerate(lines, 1):
                    reasons[_reason(root, index, number, line)] += 1
                    # A whole record that ends the file without its newline (another tool's file)
                    # would run into the next unit's first one; a torn one _reason refuses.
                    merged.write(line if line.endswith(b"\n") else line + b"\n")
    stage_info = {stage_name(s): {"resolution": s.resolution, "patch_size": cfg.patch_size,
                                  "buckets": stages[stage_name(s)]} for s in cfg.stages}
    index = mf.build_index(root, identity, to_dict(cfg), stage_info, markers)
    summary = {
        "units": len(units), "done_units": len(results), "failed_units": {str(k): v for k, v in sorted(failed.items())},
        "skipped_units": sum(r["skipped"] for r in results.values()),
        "stages": {s: index["stages"][s]["totals"] for s in stages},
        "rejects_by_reason": dict(sorted(reasons.items())), "seconds": round(seconds, 3),
        "new_samples_per_s": round(new_samples / max(seconds, 1e-9), 2),
    }
    index["summary"] = summary
    index["complete"] = len(results) == len(units)  # readers: False means rerun before training on it
    storage.write_bytes_atomic(storage.join(root, mf.INDEX_NAME), mf.json_bytes(index))
    _print_summary(summary)
    return summary


def _reason(root: str, index: int, number: int, line: bytes) -> str:
    """The reason of line `number` of unit `index`'s rejects file; a ValueError naming the file
    and line when it is no reject record (the merged file is then not written)."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        problem = f"{type(e).__name__}: {e}"
    else:
        reason = record.get("reason") if isinstance(record, dict) else None
        if isinstance(reason, str):
            return reason
        problem = "no 'reason' string"
    raise ValueError(f"{mf.rejects_url(root, index)} line {number} is not a reject record "
                     f"({problem}): delete {storage.join(root, '*', f'{index:06d}.done.json')} "
                     f"to redo that unit")


def _print_summary(s: dict[str, Any]) -> None:
    print(f"extract: {s['done_units']}/{s['units']} units done ({s['skipped_units']} already done, "
          f"{len(s['failed_units'])} failed) in {s['seconds']:.1f}s, {s['new_samples_per_s']} new samples/s")
    for name, t in s["stages"].items():
        ok = "ok" if t["inputs"] == t["samples"] + t["rejected"] else "MISMATCH"
        up, icc = ("?" if t[k] is None else t[k] for k in ("upscaled", "icc_ignored"))  # ?: an earlier bdt's
        print(f"  stage {name}: inputs {t['inputs']} = written {t['samples']} + rejected {t['rejected']} [{ok}], "
              f"{up} upscaled, {icc} with an ICC profile ignored (colours read as sRGB)")
    if s["rejects_by_reason"]:
        print("  rejects: " + ", ".join(f"{k} {v}" for k, v in s["rejects_by_reason"].items()))
    for index, why in s["failed_units"].items():
        print(f"  FAILED unit {index}: {why} (rerun to retry)")
