"""pyflakes over every Python file of the repository: unused imports and variables, undefined
names, redefinitions. A finding is a defect (dead code, or a name that fails only when its line
runs); fix it rather than silence it."""

import subprocess
import sys

from testkit import REPO

TREES = ["bdt", "tests", "bench", "scripts", "pipelines", "tokenizers", "cluster"]


def test_pyflakes_finds_nothing():
    found = subprocess.run([sys.executable, "-m", "pyflakes", *TREES], cwd=REPO,
                           capture_output=True, text=True)
    assert found.returncode == 0 and not found.stdout, found.stdout + found.stderr
