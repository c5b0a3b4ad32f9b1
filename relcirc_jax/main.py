"""Command-line entry: python -m relcirc_jax.main --config=configs/rte_dit_micro.py:cpu --workdir=DIR --mode=train.

Modes: train (or resume), sample (PNG grid + .npz from the latest checkpoint), evaluate (eval.json + eval.md for the
latest checkpoint), analyze (not implemented yet). Override any config value with --config.train.lr=3e-4 etc.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from relcirc_jax import config as config_lib

MODES = ("train", "sample", "evaluate", "analyze")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/rte_dit_micro.py:cpu.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, samples, eval tables.")
flags.DEFINE_enum("mode", "train", MODES, "What to do with the run.")
flags.DEFINE_multi_string("prompt", None, "--mode=sample: a caption to sample (repeatable); default the fixed grid.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass options as --name=value.")
    config, workdir = FLAGS.config, FLAGS.workdir
    if FLAGS.mode == "train":
        from relcirc_jax.train import loop
        loop.train(config, workdir)
    elif FLAGS.mode == "sample":
        from relcirc_jax.train import sample
        sample.run_sample(config, workdir, FLAGS.prompt)
    elif FLAGS.mode == "evaluate":
        from relcirc_jax.train import evaluate
        evaluate.run_evaluate(config, workdir)
    else:
        raise NotImplementedError("--mode=analyze is not implemented yet; the circuit analyses live in "
                                  "relcirc_jax.analysis and will get their CLI mode later.")


def parse_flags(argv):
    """absl flag parsing, with a clear message for an unknown --config.* override key."""
    try:
        config_lib.check_override_keys(argv)
    except ValueError as error:
        sys.exit(f"FATAL Flags parsing error: {error}")
    return FLAGS(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
