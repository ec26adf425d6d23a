"""Train the AR model: `deepspeed bdt/train.py --config X.yaml [key=value ...]`.

Also runs under `torchrun --nproc_per_node N bdt/train.py ...` and as a plain
`python bdt/train.py ...` (a world of one). Several --config files merge left to right;
key=value overrides come last (bdt.config.load). See bdt/training/ar/config.py for the keys.

This script wires the layers together: the loop (bdt.training.ar) runs the previews
(bdt.generation) and evaluations (bdt.eval) built here, which it does not import itself.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bdt import storage
from bdt.config import ConfigError, load
from bdt.entry import fail, setup_logging, split_launcher_args
from bdt.training.run_dir import LaunchRecord


def load_config(argv: list[str]):
    """The TrainConfig this script's arguments describe (also used by bdt.cluster.resume)."""
    args, _ = split_launcher_args(argv)
    parser = argparse.ArgumentParser(prog="bdt/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    ns = parser.parse_intermixed_args(args)  # key=value may come before or after the options
    from bdt.training.ar.config import TrainConfig

    return load(TrainConfig, ns.config, ns.overrides)


def in_loop_tasks(cfg, dist) -> list:
    """This rank's sample-grid previews and shapes-suite evaluations. Under ZeRO-3 every rank
    takes part in the forward passes of generation; otherwise rank 0 alone makes the previews,
    and the ranks share the evaluation's batches. The image tokenizer that decodes for both is
    loaded once."""
    from bdt.eval.in_loop import InLoopEval
    from bdt.generation.preview import Preview
    from bdt.tokenizer.io import load_tokenizer

    zero3 = cfg.deepspeed.zero_stage == 3
    previews = cfg.logging.sample_every > 0 and (dist.is_main or zero3)
    decoder = load_tokenizer(cfg.data.tokenizer) if previews or cfg.eval.every > 0 else None
    # The evaluation first: its ranks meet in collectives, where a preview that rank 0 made
    # alone before it would keep them past the timeout (the loop's patient barrier follows both).
    return [InLoopEval(cfg.eval, decoder, cfg.run_dir, cfg.seed, zero3, dist.is_main),
            Preview(cfg.logging, decoder, cfg.run_dir, cfg.seed, dist.is_main or zero3,
                    dist.is_main, together=zero3)]


def train(cfg, in_loop=in_loop_tasks) -> dict:
    """Run the AR training job of `cfg` (a TrainConfig) with its in-loop tasks."""
    from bdt.training.ar.loop import run

    return run(cfg, in_loop)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    from bdt.training.divergence import TrainingDiverged
    from bdt.training.signals import StoppedBeforeStart
    launch = LaunchRecord()

    def tasks_once_set_up(cfg, dist):  # the loop asks for them with the model and resume done
        tasks = in_loop_tasks(cfg, dist)
        launch.set_up(dist.is_main)
        return tasks

    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        launch.run_dir = cfg.run_dir
        train(cfg, tasks_once_set_up)
    except (ConfigError, ValueError, *storage.STORE_ERRORS) as e:  # botocore's are no OSError
        launch.failed(e)
        fail(str(e))
    except TrainingDiverged as e:  # the message names the step, ranks, values and samples
        fail(str(e), code=1)
    except RuntimeError as e:  # a rank that lost another: one line, not a transport traceback
        from bdt.training.distributed import lost_peer_line

        if (line := lost_peer_line(e)) is None:
            raise
        fail(line, code=1)
    except StoppedBeforeStart as e:  # a rerun resumes as usual
        logging.getLogger("bdt.train").warning("%s", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
