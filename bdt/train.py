"""Train the AR model: `deepspeed bdt/train.py --config X.yaml [key=value ...]`.

Also runs under `torchrun --nproc_per_node N bdt/train.py ...` and as a plain
`python bdt/train.py ...` (a world of one). Several --config files merge left to right;
key=value overrides come last (bdt.config.load). See bdt/trainer/train_config.py for the keys.
"""

from __future__ import annotations

import argparse
import sys

from bdt.config import ConfigError, fail, load, split_launcher_args


def load_config(argv: list[str]):
    """The TrainConfig this script's arguments describe (also used by bdt.cluster.resume)."""
    args, _ = split_launcher_args(argv)
    parser = argparse.ArgumentParser(prog="bdt/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_args(args)
    from bdt.trainer.train_config import TrainConfig

    return load(TrainConfig, ns.config, ns.overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        from bdt.trainer.loop import run

        run(cfg)
    except (ConfigError, ValueError, OSError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
