"""scripts/offline_wheels.py: which wheels an offline target needs, and installing them there.
(Downloading needs the package index; `download` is exercised by hand, README "On a GPU".)"""

import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

from testkit import REPO

sys.path.insert(0, str(REPO / "scripts"))

import offline_wheels  # noqa: E402  (scripts/ is not a package)


def test_closure_is_bdts_runtime_dependencies_at_the_installed_versions():
    found = offline_wheels.closure("bdt", "3.12")
    for name in ("deepspeed", "transformers", "webdataset", "omegaconf", "hjson", "pydantic-core"):
        assert found[name] == metadata.version(name)
    # The target's torch stays; Ray, TensorBoard and dev tools are not carried.
    assert not {"torch", "ray", "tensorboard", "pytest", "moto"} & found.keys()
    assert not [n for n in found if n.startswith(("nvidia-", "cuda-"))]
    # --without drops a package with what only it needs, and keeps what others need too.
    lean = offline_wheels.closure("bdt", "3.12", frozenset({"s3fs"}))
    assert not {"s3fs", "aiobotocore", "botocore"} & lean.keys()
    assert {"fsspec", "transformers"} <= lean.keys()


def test_needed_leaves_out_what_the_target_has_at_that_version(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("# the target's pip list --format=freeze\nTransformers==5.17.0\nnumpy\n\n"
                    "webdataset==1.0.2\n")
    wanted = {"transformers": "5.23.0", "numpy": "2.4.6", "webdataset": "1.0.2", "hjson": "3.1.0"}
    assert offline_wheels.needed(wanted, offline_wheels.read_have(str(have))) == {
        "transformers": "5.23.0", "hjson": "3.1.0"}


def _wheel(folder, name: str, version: str) -> None:
    """A minimal pure-Python wheel holding module `name` (VALUE = version)."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VALUE = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_install_makes_the_wheels_importable_from_site(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "bdt_probe_one", "1.0")
    _wheel(wheels, "bdt_probe_two", "2.5")
    script = str(REPO / "scripts" / "offline_wheels.py")
    done = subprocess.run([sys.executable, script, "install", str(wheels), str(site)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check = subprocess.run([sys.executable, "-c", "import bdt_probe_one as a, bdt_probe_two as b; "
                            "print(a.VALUE, b.VALUE)"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=done.stdout.strip()))
    assert check.stdout.split() == ["1.0", "2.5"], check.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([sys.executable, script, "install", str(empty), str(site)],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no .whl files" in failed.stderr


def test_have_lines_pip_writes_are_read_and_others_named(tmp_path):
    """`pip freeze` writes `name @ URL` for what came from a file (torch on many CUDA images):
    it was read as a package named 'torch @ file:///...', so torch looked missing; spaces around
    == made 'transformers ' another name; other lines passed silently as odd names."""
    have = tmp_path / "have.txt"
    have.write_text("torch @ file:///wheels/torch-2.11.0-cp312-linux_x86_64.whl\n"
                    "Transformers == 5.17.0\nsix==1.17.0 ; python_version > '3'\n")
    assert offline_wheels.read_have(str(have)) == {"torch": None, "transformers": "5.17.0",
                                                   "six": "1.17.0"}
    for line in ("requests>=2.0", "numpy==", "==1.0", "-e git+https://example.org/x"):
        have.write_text(f"numpy\n{line}\n")
        with pytest.raises(SystemExit, match=f"line 2: '{re.escape(line)}' is not"):
            offline_wheels.read_have(str(have))
    have.write_text("numpy\n", encoding="utf-16")  # PowerShell's `pip list > have.txt`
    with pytest.raises(SystemExit, match="have.txt: 'utf-8' codec"):
        offline_wheels.read_have(str(have))


@pytest.mark.slow
def test_download_says_in_one_line_what_is_wrong(tmp_path):
    """A misspelt --without left out nothing, silently, and a package index out of reach ended
    in a traceback saying the package had no wheel for the target."""
    script = str(REPO / "scripts" / "offline_wheels.py")
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    out = tmp_path / "wheels"
    typo = subprocess.run([sys.executable, script, "download", str(out), "--without", "s3fss"],
                          capture_output=True, text=True, env=env)
    assert typo.returncode != 0 and "--without s3fss: not among bdt's dependencies" in typo.stderr
    assert not out.exists()
    offline = subprocess.run([sys.executable, script, "download", str(out)], capture_output=True,
                             text=True, env=env)
    assert offline.returncode != 0 and "Traceback" not in offline.stderr
    assert "(is it reachable?)" in offline.stderr
