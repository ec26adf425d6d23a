"""Where the BitDance reference fixtures live: `tests/fixtures/bitdance/` (provenance in its
README), or another directory of the same format named by `$BDT_REFERENCE_DIR`; and reading them
(tensors, released weights, the seeds and arguments their JSON gives for each call).

They are the ground truth for checkpoint compatibility, so a missing directory is an error,
never a silent skip.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

REF = Path(os.environ.get("BDT_REFERENCE_DIR",
                          Path(__file__).resolve().parent / "fixtures" / "bitdance"))
if not (REF / "README.md").is_file():
    raise FileNotFoundError(f"BitDance reference fixtures not found in {REF} "
                            "(expected tests/fixtures/bitdance/README.md, or set BDT_REFERENCE_DIR)")


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A fixture's JSON and its tensors (`<name>.json`, `<name>.safetensors` in REF)."""
    return json.loads((REF / f"{name}.json").read_text()), load_file(REF / f"{name}.safetensors")


def fixture_params(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released weights in a fixture, `param.<key>` (fp16) -> `<key>` as the fp32 values the
    reference ran with."""
    return {k[len("param."):]: v.float() for k, v in tensors.items() if k.startswith("param.")}


def call_value(call: str, name: str) -> float:
    """A number the fixture's description of a call gives: `name(N)` or `name=N`, e.g.
    call_value("torch.manual_seed(80); head.sample(c, cfg=1.0)", "manual_seed") == 80."""
    found = re.search(rf"\b{re.escape(name)}(?:\(|=)\s*(-?[0-9.]+)", call)
    if found is None:
        raise KeyError(f"no {name} in the fixture's call {call!r}")
    return float(found.group(1))


def seed_of(call: str) -> int:
    """The N of `torch.manual_seed(N)` in a fixture's description of a call."""
    return int(call_value(call, "manual_seed"))


def seed_decoder_noise(meta: dict) -> None:
    """Seed a tokenizer fixture's generative decoder for its one noise draw as the fixture did
    (`gan_noise_rng`); a plain decoder draws nothing."""
    torch.manual_seed(seed_of(meta["gan_noise_rng"]["seed_call"]) if "gan_noise_rng" in meta else 0)
