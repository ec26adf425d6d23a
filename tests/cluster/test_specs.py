"""Every spec in cluster/ and every file in configs/ parses; the specs pass their tool's own schema
where one ships here and name entry points, files and config keys that exist (configs are loaded
with bdt's real loader)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from bdt.cluster.run_state import paths_from_command
from bdt.config import load

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
PRESETS = sorted((REPO / "configs" / "cluster").glob("zero_*.yaml"))
RECIPE = "configs/train/ar_progressive.yaml"
REQUIRED = ["run_dir=/runs/r", "model.backbone.path=/models/llm", "data.tokenizer=/models/tok",
            "data.root=s3://bucket/tokens"]


def test_every_spec_and_config_parses():
    specs = sorted(p for root in (CLUSTER, REPO / "configs") for p in root.rglob("*")
                   if p.suffix in (".yaml", ".yml", ".json"))
    assert len(specs) >= 20, specs
    for path in specs:
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_shell_scripts_are_valid_bash():
    scripts = [*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch"),
               *(REPO / "scripts" / name for name in ("cluster_rehearsal.sh", "local_ray.sh",
                                                       "demo.sh"))]
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True)


def _ds_config(cfg):
    """The DeepSpeed dict bdt builds from a training config, checked by DeepSpeed's own config
    classes (unknown ZeRO keys are errors there)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from bdt.training.deepspeed_config import build_ds_config

    ds = build_ds_config(cfg.deepspeed, cfg.optim, world_size=1)
    return ds, DeepSpeedConfig(ds)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_training_presets_load_with_the_trainers_loader(preset):
    from bdt.training.ar.config import TrainConfig, validate

    cfg = OmegaConf.to_object(load(TrainConfig, [str(REPO / RECIPE), str(preset)], REQUIRED))
    validate(cfg)
    assert [s.name for s in cfg.stages] == ["256", "512", "1024"]
    assert all(s.shards == "s3://bucket/tokens" and s.token_budget >= 8192 for s in cfg.stages)
    assert cfg.deepspeed.precision == "bf16" and cfg.model.backbone.dtype == "bfloat16"
    ds, checked = _ds_config(cfg)
    assert checked.zero_optimization_stage == cfg.deepspeed.zero_stage
    assert checked.bfloat16_config.enabled


def test_presets_grow_with_model_size():
    from bdt.training.ar.config import TrainConfig

    cfgs = {p.stem: load(TrainConfig, [str(REPO / RECIPE), str(p)], REQUIRED) for p in PRESETS}
    assert list(cfgs) == ["zero_14b", "zero_1b", "zero_8b"]
    assert cfgs["zero_14b"].deepspeed.zero_stage == 3
    assert not cfgs["zero_1b"].model.activation_checkpointing
    assert cfgs["zero_8b"].model.activation_checkpointing
    assert cfgs["zero_14b"].model.activation_checkpointing
    widths = [cfgs[k].model.head.width for k in ("zero_1b", "zero_8b", "zero_14b")]
    assert widths == sorted(widths) and len(set(widths)) == 3


def test_offload_overlay_reaches_deepspeed():
    from bdt.training.ar.config import TrainConfig

    files = [str(REPO / RECIPE), str(REPO / "configs/cluster/zero_14b.yaml"),
             str(REPO / "configs/cluster/offload_cpu.yaml")]
    cfg = OmegaConf.to_object(load(TrainConfig, files, REQUIRED))
    ds, checked = _ds_config(cfg)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"]  # the preset's keys survive the overlay
    assert checked.zero_config.offload_optimizer.device == "cpu"
    assert checked.zero_config.offload_param.device == "cpu"


def _check_runtime_env(env: dict, base: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)  # Ray's own type checks (env_vars must be str -> str, ...)
    assert (base / env["working_dir"]).is_dir()
    assert "AWS_DEFAULT_REGION" in env["env_vars"]


def _check_extract_entrypoint(argv: list[str]) -> None:
    from bdt.extract.config import ExtractConfig

    assert argv[:2] == ["python", "pipelines/extract_tokens.py"]
    assert (REPO / argv[1]).is_file()
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    assert configs and all((REPO / c).is_file() for c in configs)
    cfg = load(ExtractConfig, [str(REPO / c) for c in configs], overrides)
    assert cfg.output.startswith("s3://") and cfg.inputs.startswith("s3://")


def test_ray_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray/cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    workers = raw["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 < workers["max_workers"]  # autoscaling from zero
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    # the submit command in its header names a real runtime env and entry point
    header = (CLUSTER / "ray/cluster.yaml").read_text()
    assert "--runtime-env cluster/ray/runtime_env.yaml" in header
    runtime_env = yaml.safe_load((CLUSTER / "ray/runtime_env.yaml").read_text())
    _check_runtime_env(runtime_env, REPO)
    assert ".venv/" in runtime_env["excludes"]  # 2 GB the job must not upload


def test_rayjob_runs_the_extraction_with_its_runtime_env():
    job = yaml.safe_load((CLUSTER / "ray/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_extract_entrypoint(shlex.split(job["spec"]["entrypoint"]))
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    # the image puts the repository at /home/ray/bdt (cluster/docker/Dockerfile)
    assert env["working_dir"] == "/home/ray/bdt"
    assert "COPY --chown=ray:users . /home/ray/bdt" in (CLUSTER / "docker/Dockerfile").read_text()
    _check_runtime_env({**env, "working_dir": "."}, REPO)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"]
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_k8s_torchrun_job_command_loads():
    service, job = list(yaml.safe_load_all((CLUSTER / "k8s/train-job.yaml").read_text()))
    assert service["spec"]["clusterIP"] == "None" and job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    argv = shlex.split(container["args"][0])
    assert argv[:4] == ["exec", "python", "-m", "bdt.cluster.resume"]
    assert "torchrun" in argv and "bdt/train.py" in argv
    paths = paths_from_command(argv)  # the trainer's loader reads the same arguments
    assert paths.run_dir.startswith("/nfs/") and paths.checkpoint_dir.startswith("s3://")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NNODES"] == str(job["spec"]["completions"]) == str(job["spec"]["parallelism"])
    exit_codes = {code for rule in job["spec"]["podFailurePolicy"]["rules"]
                  for code in rule.get("onExitCodes", {}).get("values", [])}
    from bdt.cluster.resume import CANNOT_START, GAVE_UP, STOPPED, USAGE

    assert {STOPPED, GAVE_UP, USAGE, CANNOT_START} <= exit_codes
    # the wrapper is the container's main process; the pause container, PID 1, reaps orphans
    assert pod["shareProcessNamespace"] is True


def test_sbatch_script_requeues_and_launches_the_trainer():
    text = (CLUSTER / "slurm/train.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert "requeue" in directives and directives["signal"].startswith("B:USR1@")
    lead = int(directives["signal"].split("@")[1])
    grace = int(re.search(r"--grace (\d+)", text).group(1))
    assert grace < lead  # the wrapper kills before SLURM does
    assert "scontrol requeue" in text and "python -m bdt.cluster.hosts slurm" in text
    assert "cluster/deepspeed/launch.sh) ;;" in text and (CLUSTER / "deepspeed/launch.sh").is_file()
    assert "bdt/train.py" in text and (REPO / "bdt/train.py").is_file()
    # the usage example in its header is a loadable training command
    usage = r"sbatch --nodes 2 cluster/slurm/train.sbatch \\\n(.*?)\n#\n"
    example = re.search(usage, text, re.S).group(1)
    argv = shlex.split(example.replace("\\\n", " ").replace("#", " "))
    paths = paths_from_command(["bdt/train.py", *argv])
    assert paths.checkpoint_dir.startswith("s3://")
    for config in [a for a in argv if a.endswith(".yaml")]:
        assert (REPO / config).is_file()


@pytest.mark.slow
def test_sbatch_script_stops_on_a_bad_allocation(tmp_path):
    """A node list the helper rejects ends the job with the helper's error and code, before any
    launch (not later, on an unset variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-",
               SLURM_GPUS_ON_NODE="2", BDT_JOB_DIR=str(tmp_path),
               PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")  # a checkout without .venv
    out = subprocess.run(["bash", str(CLUSTER / "slurm/train.sbatch"), "run_dir=/x"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bad SLURM node list 'n[1-'" in out.stderr, out.stderr
    assert not (tmp_path / "hostfile").exists()
