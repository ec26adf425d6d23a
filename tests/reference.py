"""Where the BitDance reference fixtures live: `tests/fixtures/bitdance/` (provenance in its
README), or another directory of the same format named by `$BDT_REFERENCE_DIR`.

They are the ground truth for checkpoint compatibility, so a missing directory is an error,
never a silent skip.
"""

import os
from pathlib import Path

REF = Path(os.environ.get("BDT_REFERENCE_DIR",
                          Path(__file__).resolve().parent / "fixtures" / "bitdance"))
if not (REF / "README.md").is_file():
    raise FileNotFoundError(f"BitDance reference fixtures not found in {REF} "
                            "(expected tests/fixtures/bitdance/README.md, or set BDT_REFERENCE_DIR)")
