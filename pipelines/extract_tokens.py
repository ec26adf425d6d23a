"""Pre-extract binary image tokens with Ray (system §1; the library is bdt/extract/).

    ray job submit --working-dir . -- python pipelines/extract_tokens.py --config pipelines/configs/shapes.yaml
    python pipelines/extract_tokens.py --config pipelines/configs/shapes.yaml output=/tmp/tok  # local Ray

Under `ray job submit` (or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a
private local Ray bound to 127.0.0.1. Exit code 0 when every input unit is done, 1 when some
failed (rerun the same command to retry them), 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys

# `ray job submit --working-dir .` runs this file from the uploaded copy of the repo: import
# that copy's `bdt` (the workers get the same directory on their path from Ray's runtime_env).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdt.config import ConfigError, fail, load, split_launcher_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, _ = split_launcher_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_args(args)

    from bdt.extract.config import ExtractConfig
    from bdt.extract.run import run

    try:
        cfg = load(ExtractConfig, ns.config, ns.overrides)
    except ConfigError as exc:
        fail(str(exc))
    # Loopback only for a private Ray (without this Ray 2.60 binds the external interface).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the cluster of `ray job submit` / RAY_ADDRESS
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        summary = run(cfg)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    finally:
        ray.shutdown()
    return 1 if summary["failed_units"] else 0


if __name__ == "__main__":
    sys.exit(main())
