"""The command lines the docs give a new user to copy (README.md, cluster/README.md,
tokenizers/README.md, configs/README.md, pipelines/README.md, docs/*.md) name subcommands, flags
and config keys that exist: each `bdt ...` line parses with the CLI's own parser, and each
training or extraction command loads with its job's own config loader."""

import glob
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "cluster/README.md", "tokenizers/README.md", "configs/README.md",
        "pipelines/README.md", *sorted(glob.glob("docs/*.md", root_dir=REPO))]
TRAINERS = ("bdt/train.py", "tokenizers/train.py", "pipelines/extract_tokens.py")
# How a copied command line starts (the rest of a code block is file layouts and prose).
LAUNCH = re.compile(r"(bdt|python|deepspeed|torchrun|ray|mkdir|[A-Z_]+=\S*)\s")


def _commands(text: str) -> list[list[str]]:
    """The shell commands of the doc's code blocks: comments dropped, `\\` continuations joined,
    an `ARGS=(...)` array put where a later command says "${ARGS[@]}", `[optional ...]` parts and
    lines that elide arguments (`...`) left out; `key=...` stays (a value to fill in)."""
    out, arrays = [], {}
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang not in ("", "bash", "sh"):
            continue
        block = re.sub(r"(?m)(^|\s)#\s.*$", "", block).replace("\\\n", " ")
        for name, body in re.findall(r"(\w+)=\(([^)]*)\)", block):
            arrays[name] = body.split()
        block = re.sub(r"\w+=\([^)]*\)", "", block)
        for name, words in arrays.items():
            block = block.replace(f'"${{{name}[@]}}"', " ".join(words))
        for line in block.splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line).strip()
            if LAUNCH.match(line) and "..." not in line.split():
                out.append(shlex.split(line))
    return out


COMMANDS = [(doc, argv) for doc in DOCS for argv in _commands((REPO / doc).read_text())]


def _ids(case) -> str:
    return f"{case[0]}: {' '.join(case[1])[:70]}"


BDT = [c for c in COMMANDS if c[1][0] == "bdt"]
# The SLURM script hands its arguments to bdt/train.py (cluster/slurm/train.sbatch).
JOBS = [(doc, argv, script) for doc, argv in COMMANDS
        for script in (*TRAINERS, "cluster/slurm/train.sbatch") if script in argv]


def test_the_docs_hold_the_commands_a_user_copies():
    assert len(BDT) >= 10 and len(JOBS) >= 10, (len(BDT), len(JOBS))
    assert {tuple(argv[1:3]) for _, argv in BDT} >= {
        ("data", "shapes"), ("data", "verify"), ("tokenizer", "encode"), ("tokenizer", "decode"),
        ("sample", "--model"), ("eval", "--model"), ("model", "import-bitdance")}


@pytest.mark.parametrize("case", BDT, ids=_ids)
def test_documented_bdt_command_parses(case, capsys):
    from bdt.cli import build_parser

    doc, argv = case
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{doc}: `{shlex.join(argv)}` does not parse: {capsys.readouterr().err}")


@pytest.mark.parametrize("case", JOBS, ids=lambda c: _ids(c[:2]))
def test_documented_job_command_loads_its_config(case, monkeypatch):
    """Unknown keys, wrong types and config files that do not exist fail here as for the user."""
    doc, argv, script = case
    # `key=...`: the value is the user's to give (YAML would read `...` as a document end)
    args = [re.sub(r"=\.\.\.$", "=/x", a) for a in argv[argv.index(script) + 1:]]
    monkeypatch.chdir(REPO)  # config paths are relative to the repository root (configs/README)
    if script in ("bdt/train.py", "cluster/slurm/train.sbatch"):
        from bdt.train import load_config

        cfg = OmegaConf.to_object(load_config(args))
        assert cfg.run_dir and cfg.stages, (doc, argv)
    elif script == "tokenizers/train.py":
        from bdt.training.tokenizer.config import load_command

        cfg, _ = load_command(args)
        assert cfg.run_dir, (doc, argv)
    else:
        from bdt.config import load
        from bdt.extract.config import ExtractConfig

        configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        assert len(configs) + len(overrides) + args.count("--config") == len(args), (doc, argv)
        cfg = load(ExtractConfig, configs, overrides)
        assert cfg.inputs and cfg.output and cfg.tokenizer, (doc, argv)
