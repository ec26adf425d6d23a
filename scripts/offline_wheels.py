"""Wheels that carry bdt's dependencies to an offline machine that has Python and its own torch.

    .venv/bin/python scripts/offline_wheels.py download OUT [--python 3.12] [--have FILE]
                                                            [--without NAME ...]
    python scripts/offline_wheels.py install OUT SITE     (on the target; prints SITE)

`download` writes OUT/*.whl: bdt's runtime dependency closure at the versions installed in this
environment (one resolve measured to work together), less torch and its CUDA packages (the
target's own build stays), Ray (pre-extraction runs on the Ray cluster; its wheel alone is
~70 MB) and TensorBoard (optional logging). `--have FILE` lists what the target already has,
a line `name` or `name @ URL` (any version) or `name==version` (e.g. its `pip list
--format=freeze`): those are left out unless their version differs, a line of another form is an
error naming it; `--without NAME` leaves out a package and what only it needs (e.g. s3fs, ~20 MB
with botocore, where storage is local). Wheels for the target's Python come from the package
index; a package published only as source (deepspeed) is built here as a pure-Python wheel
(DS_BUILD_OPS=0: DeepSpeed JIT-builds the CUDA ops it uses on the target).

`install` puts the wheels into SITE (`pip install --no-index --no-deps --target`), which then
goes on PYTHONPATH, before the target's site-packages; scripts/gpu_check.sh and gpu_quality.sh
do this themselves when BDT_WHEELS names such a folder (or ./wheels exists).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

# What the target keeps or does without (see the module doc); nvidia-* and cuda-* come with torch.
SKIP = {"torch", "triton", "ray", "tensorboard"}
SKIP_PREFIXES = ("nvidia-", "cuda-")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _marker_env(python: str) -> dict[str, str]:
    """Environment markers of a Linux x86_64 CPython `python` target, no extras."""
    return {"python_version": python, "python_full_version": f"{python}.0", "extra": "",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "os_name": "posix"}


def closure(root: str, python: str, without: frozenset[str] = frozenset()) -> dict[str, str]:
    """name -> installed version of every distribution `root` needs, transitively, on the target
    (requirements whose markers exclude it are not followed), less SKIP and `without`."""
    from packaging.requirements import Requirement

    env, found, todo = _marker_env(python), {}, [root]
    skip = SKIP | {_canonical(n) for n in without}
    while todo:
        for text in metadata.distribution(todo.pop()).requires or []:
            req = Requirement(text)
            name = _canonical(req.name)
            if (req.marker and not req.marker.evaluate(env)) or name in found \
                    or name in skip or name.startswith(SKIP_PREFIXES):
                continue
            found[name] = metadata.version(req.name)
            todo.append(req.name)
    return found


def read_have(path: str) -> dict[str, str | None]:
    """The target's distributions: name -> version, or None where any version will do (`name`,
    or `name @ URL` as `pip freeze` writes what came from a file). SystemExit naming the line
    of anything else: a misread line would carry a package the target has, or miss one."""
    from packaging.requirements import InvalidRequirement, Requirement

    have: dict[str, str | None] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"offline_wheels: --have {path}: {e} (a UTF-8 text file, one name a line)")
    for number, text in enumerate(lines, 1):
        line = text.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            req = None
        pins = [s.version for s in req.specifier if s.operator == "=="] if req else []
        if req is None or len(req.specifier) != len(pins) or len(pins) > 1:
            raise SystemExit(f"offline_wheels: --have {path} line {number}: {text.strip()!r} is "
                             f"not `name`, `name==version` or `name @ URL`")
        have[_canonical(req.name)] = pins[0] if pins else None
    return have


def needed(wanted: dict[str, str], have: dict[str, str | None]) -> dict[str, str]:
    """What the target lacks: missing there, or there at another version."""
    return {n: v for n, v in wanted.items() if n not in have or have[n] not in (None, v)}


def _pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=env)


def download(out: str, python: str, have: dict[str, str | None],
             without: frozenset[str] = frozenset()) -> list[str]:
    """Write the wheels into `out`; returns their file names. RuntimeError naming a package that
    has neither a wheel for the target nor a pure-Python build."""
    os.makedirs(out, exist_ok=True)
    target = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:",
              *(a for p in PLATFORMS for a in ("--platform", p))]
    for name, version in sorted(needed(closure("bdt", python, without), have).items()):
        spec = f"{name}=={version}"
        got = _pip("download", "--no-deps", "--quiet", *target, "-d", out, spec)
        if got.returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:  # source only: a pure-Python wheel, or fail
            built = _pip("wheel", "--no-deps", "--quiet", "-w", tmp, spec,
                         env=dict(os.environ, DS_BUILD_OPS="0"))
            wheels = os.listdir(tmp) if built.returncode == 0 else []
            if len(wheels) != 1 or not wheels[0].endswith("-py3-none-any.whl"):
                why = (got.stderr + built.stderr).strip()[-300:]
                raise RuntimeError(f"{spec}: neither a wheel for CPython {python} on Linux x86_64 "
                                   f"nor a pure-Python build came from the package index (is it "
                                   f"reachable?); pip: {why}")
            shutil.move(os.path.join(tmp, wheels[0]), os.path.join(out, wheels[0]))
    return sorted(f for f in os.listdir(out) if f.endswith(".whl"))


def install(wheels: str, site: str) -> None:
    files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl"))
    if not files:
        raise SystemExit(f"offline_wheels: no .whl files in {wheels}")
    done = _pip("install", "--no-index", "--no-deps", "--quiet", "--target", site, *files)
    if done.returncode != 0:
        raise SystemExit(f"offline_wheels: pip install failed:\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="write the wheels the target lacks into OUT")
    p.add_argument("out")
    p.add_argument("--python", default="3.12", help="the target's Python, X.Y")
    p.add_argument("--have", help="file of the target's distributions (name or name==version)")
    p.add_argument("--without", action="append", default=[], metavar="NAME",
                   help="leave out this package and what only it needs (repeatable)")
    p = sub.add_parser("install", help="install the wheels of DIR into SITE (on the target)")
    p.add_argument("wheels")
    p.add_argument("site")
    args = parser.parse_args()
    if args.command == "install":
        install(args.wheels, args.site)
        print(args.site)
        return
    unknown = {_canonical(n) for n in args.without} - closure("bdt", args.python).keys()
    if unknown:  # a misspelt name would leave out nothing, silently
        raise SystemExit(f"offline_wheels: --without {', '.join(sorted(unknown))}: not among "
                         f"bdt's dependencies on the target")
    try:
        files = download(args.out, args.python, read_have(args.have) if args.have else {},
                         frozenset(args.without))
    except RuntimeError as e:
        raise SystemExit(f"offline_wheels: {e}")
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    print(f"{len(files)} wheels, {size / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
