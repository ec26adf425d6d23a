"""Where the BitDance reference fixtures live: `shared/reference/bitdance` beside the repository
(as on developer machines and in CI), or `$BDT_REFERENCE_DIR`.

They are the ground truth for checkpoint compatibility, so a missing directory is an error,
never a silent skip.
"""

import os
from pathlib import Path

REF = Path(os.environ.get("BDT_REFERENCE_DIR",
                          Path(__file__).resolve().parents[2] / "shared" / "reference" / "bitdance"))
if not (REF / "README.md").is_file():
    raise FileNotFoundError(f"BitDance reference fixtures not found in {REF} "
                            "(expected ../shared beside the repository, or set BDT_REFERENCE_DIR)")
