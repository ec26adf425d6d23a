"""The fixed evaluation suite: prompts with their specs, 40 per GenEval-style category.

Built deterministically by the dataset's own spec/caption code and shipped as `suite.jsonl` in
the package, so every checkpoint is scored on the same prompts; a test checks that the shipped
file equals `build_suite()`. Regenerate with `python -m bdt.eval.suite`.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from bdt.data.shapes import CATEGORIES, caption, sample_spec

SUITE_SEED = 20260101
PER_CATEGORY = 40
SUITE_FILE = "suite.jsonl"


def build_suite(seed: int = SUITE_SEED, per_category: int = PER_CATEGORY) -> list[dict]:
    """Distinct prompts per category where the category has enough of them (single_object has
    few distinct specs, so its prompts vary by template); deterministic in `seed`."""
    suite = []
    for ci, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, ci])
        seen: set[str] = set()
        for k in range(per_category):
            for _ in range(100):  # bounded retries keep it deterministic and terminating
                spec = sample_spec(rng, category)
                prompt = caption(rng, spec)
                if prompt not in seen:
                    break
            seen.add(prompt)
            suite.append({"id": f"{category}-{k:03d}", "category": category, "prompt": prompt,
                          "spec": spec})
    return suite


def to_jsonl(suite: list[dict]) -> str:
    return "".join(json.dumps(item, sort_keys=True) + "\n" for item in suite)


def load_suite() -> list[dict]:
    """The shipped suite (bdt/eval/suite.jsonl)."""
    text = resources.files("bdt.eval").joinpath(SUITE_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


if __name__ == "__main__":
    path = resources.files("bdt.eval").joinpath(SUITE_FILE)
    with open(str(path), "w") as f:
        f.write(to_jsonl(build_suite()))
    print(f"wrote {path}")
