"""Pre-extract binary image tokens with Ray (system §1; the library is bdt/extract/).

    ray job submit --working-dir . -- \
        python pipelines/extract_tokens.py --config configs/extract/shapes.yaml
    python pipelines/extract_tokens.py --config configs/extract/shapes.yaml output=/tmp/tok  # local Ray

Under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a
private local Ray bound to 127.0.0.1 and stops it however the job ends (bdt/extract/ray_session.py).
The inputs are listed and checked, and the tokenizer's weights against its config, before Ray
starts. Exit code 0 when every input unit is done, 1 when some failed (rerun the same command to
retry them, also when the private Ray's GCS server or raylet died or Ray did not start), 2 on a
configuration error, 128 + N when stopped by signal N (SIGTERM, SIGINT, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# `ray job submit --working-dir .` runs this file from the uploaded copy of the repo: import
# that copy's `bdt` (the workers get the same directory on their path from Ray's runtime_env).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdt.config import ConfigError, load  # noqa: E402
from bdt.entry import fail, setup_logging, split_launcher_args  # noqa: E402


def _refuse_relative_paths_in_a_ray_job(cfg) -> None:
    """`ray job submit` runs the driver in Ray's copy of the working directory, a temp folder:
    relative inputs would be looked for there and a relative output written there, then lost.
    The job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR for the driver it starts (Ray 2.60)."""
    from bdt import storage, url_listing

    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return
    for key in ("inputs", "output", "tokenizer"):
        paths = url_listing.url_patterns(getattr(cfg, key))
        relative = next((p for p in paths if not storage.is_remote(p) and not os.path.isabs(p)), None)
        if relative is not None:
            raise ValueError(f"{key}: '{relative}' is relative; under `ray job submit` the job runs in "
                             f"Ray's temporary copy of --working-dir: give absolute or s3:// paths")


def main(argv: list[str] | None = None) -> int:
    args, _ = split_launcher_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_intermixed_args(args)  # key=value may come before or after the options
    setup_logging()

    from bdt.extract.config import ExtractConfig, validate
    from bdt.extract.manifest import output_lock
    from bdt.extract.ray_session import ray_session
    from bdt.extract.run import plan, run

    with contextlib.ExitStack() as stack:
        try:
            cfg = load(ExtractConfig, ns.config, ns.overrides)
            validate(cfg)  # before the lock: an empty `output` would put it at the root
            _refuse_relative_paths_in_a_ray_job(cfg)
            stack.enter_context(output_lock(cfg.output))  # held until the manifest is written
            planned = plan(cfg)  # inputs, tokenizer and output are checked before Ray starts
        except (ConfigError, ValueError, OSError) as exc:
            fail(str(exc))
        with ray_session():  # a private Ray is stopped on every way out this process controls
            try:
                summary = run(cfg, planned)
            except (ValueError, OSError) as exc:
                fail(str(exc))
    return 1 if summary["failed_units"] else 0


if __name__ == "__main__":
    sys.exit(main())
