"""Command-line entry: python -m relcirc_jax.main --config=configs/rte_dit_micro.py:cpu --workdir=DIR --mode=train.

Modes: train (or resume), sample (PNG grid + .npz from the latest or --step checkpoint), evaluate (eval.json + eval.md
for the latest or --step checkpoint), analyze (circuit analyses: --config.analysis.kind=synopsis|qk_screen|
ablation|patching|text|dynamics|all, or diversity|probe, which "all" leaves out; written under WORKDIR/analysis/).
Override any config value with --config.train.lr=3e-4 etc. --init_from=pretrained/NAME uses a reference model's weights
(and, without --config, its config, which --config.* overrides then change): training starts from them; sample, evaluate
and analyze use them while the workdir has no checkpoint.
With --config.init_transfer=True the --config may name another text encoder: training starts from every reference
weight that fits (all but the caption projection's input layer and the null caption).
--init_from=DIR of a diffusers PixArt transformer does the same with the checkpoint's sizes (with a --config that
names its text encoder, e.g. configs/t5_dit_b.py --config.text.t5_path=...).

Mistakes in the command (a missing config file, an unknown variant, key or value, a missing checkpoint, a workdir
that is a file, a caption with an unknown word) end in one line naming the problem and the fix, exit status 2,
before any slow work and without writing anything; --verbosity=1 adds the traceback.

Multi-process jobs (TPU pods, SLURM, several GPU hosts): start the same command on every host with --distributed
(cluster auto-detection by jax.distributed.initialize), or give --coordinator_address, --num_processes and
--process_id explicitly (e.g. several processes on one machine). See launch/README.md.
"""

import math
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from relcirc_jax import config_checks
from relcirc_jax.errors import UserError, fail

MODES = ("train", "sample", "evaluate", "analyze")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/rte_dit_micro.py:cpu.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, samples, eval tables.")
flags.DEFINE_enum("mode", "train", MODES, "What to do with the run.")
flags.DEFINE_multi_string("prompt", None, "--mode=sample: a caption to sample (repeatable); default the fixed grid.")
flags.DEFINE_integer("step", None, "--mode=sample/evaluate/analyze: the checkpoint step (default: the latest).")
flags.DEFINE_string(
    "init_from", None, "A reference model: a name under pretrained/, a directory of one, or a diffusers PixArt dir."
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process job via jax.distributed.initialize(), auto-detecting "
    "the cluster (Cloud TPU, SLURM, Open MPI) for any of the three flags below left unset.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (all three together imply --distributed)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes in the job (all three together imply --distributed).")
flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (all three together imply --distributed)."
)
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise UserError(f"Unexpected arguments {argv[1:]}. Fix: pass options as --name=value (see --help).")
    if FLAGS.prompt and FLAGS.mode != "sample":
        raise UserError(f"--prompt is read by --mode=sample only, not --mode={FLAGS.mode}. Fix: drop it, or sample.")
    if FLAGS.step is not None and FLAGS.mode == "train":
        raise UserError(
            "--step picks the checkpoint to sample, evaluate or analyze; training always resumes from the latest. "
            "Fix: drop --step (set --config.train.num_steps for where training ends)."
        )
    workdir = FLAGS.workdir
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; pass a directory (created if missing).")
    config = config_with_init_from(FLAGS.config, FLAGS.init_from)
    if config.train.time_budget_minutes == math.inf:  # the command line's None (it cannot type None)
        config.train.time_budget_minutes = None  # so config.json says null, not JSON-less Infinity
    config_checks.validate_config(config, check_mesh=False)  # before JAX starts; the mesh is checked once it has
    if config.model.in_channels != 3 and not (FLAGS.mode == "analyze" and config.analysis.kind == "qk_screen"):
        raise UserError(
            f"The model has {config.model.in_channels} input channels (a latent-space PixArt): its samples are "
            "latents, which need a VAE decoder that relcirc_jax does not have before anything can draw or score them. "
            "Fix: --mode=analyze --config.analysis.kind=qk_screen (weights only), or use a pixel-space (RGB) model."
        )
    apply_runtime_options(config)
    join_distributed_job()
    if FLAGS.mode == "train":
        from relcirc_jax.train import loop

        loop.train(config, workdir)
    elif FLAGS.mode == "sample":
        from relcirc_jax.train import sampling

        sampling.run_sample(config, workdir, FLAGS.prompt, FLAGS.step)
    elif FLAGS.mode == "evaluate":
        from relcirc_jax.train import evaluate

        evaluate.run_evaluate(config, workdir, FLAGS.step)
    else:
        from relcirc_jax import analysis

        analysis.run_analyze(config, workdir, FLAGS.step)


def config_with_init_from(config, init_from: str | None):
    """The run's config: --config's, or the reference model's own when only --init_from is given; with both, the
    model-defining fields (model, text, image size) must agree."""
    if init_from is None:
        if config is None:
            raise UserError("Pass --config=configs/<model>.py[:variant], or --init_from=pretrained/NAME.")
        return config
    from relcirc_jax import pretrained

    if pretrained.is_pixart(init_from):
        if config is None:
            raise UserError(
                f"--init_from={init_from} is a diffusers PixArt checkpoint, which brings no text encoder. Fix: add "
                "--config=configs/t5_dit_b.py --config.text.t5_path=<local T5 directory> (the encoder it was "
                "trained with; the DiT sizes are read from the checkpoint)."
            )
        config = pretrained.pixart_config(config, init_from)
        config.init_from = init_from
        return config
    reference, _ = pretrained.load_config(init_from)
    if config is None:
        config = reference
    else:
        fields = pretrained.TRANSFER_FIELDS if config.get("init_transfer") else pretrained.MODEL_FIELDS
        differing = pretrained.config_differences(config, reference, fields, any_resolution=True)
        if differing:
            raise UserError(
                f"--config and --init_from={init_from} describe different models ({'; '.join(differing[:4])}). "
                "Fix: drop --config and any --config.* override of those fields to use the model's own config, or "
                "pick the matching config file"
                + (
                    "."
                    if config.get("init_transfer")
                    else " (or --config.init_transfer=True for another text encoder)."
                )
            )
    config.unlock()
    config.init_from = init_from
    return config


def join_distributed_job() -> None:
    """Calls jax.distributed.initialize() when the flags ask for a multi-process job; must run before any JAX work."""
    explicit = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes", "process_id")}
    given = {name: value for name, value in explicit.items() if value is not None}
    if not (FLAGS.distributed or given):
        return
    if given and len(given) < len(explicit) and not FLAGS.distributed:
        missing = sorted(set(explicit) - set(given))
        raise UserError(
            f"Got --{' --'.join(sorted(given))} but not --{' --'.join(missing)}. Fix: pass all three "
            "of --coordinator_address, --num_processes and --process_id, or add --distributed to "
            "auto-detect the missing ones on a TPU pod or SLURM."
        )
    try:
        jax.distributed.initialize(**given)
    except ValueError as error:  # jax names the one value it could neither detect nor was given
        raise UserError(
            f"--distributed found no cluster to join ({error}). Fix: run under a TPU pod, SLURM or "
            "Open MPI, or pass --coordinator_address, --num_processes and --process_id."
        ) from error
    if jax.process_index() != 0:  # one progress log for the job, not one per host; warnings still show everywhere
        logging.set_verbosity(logging.WARNING)


def apply_runtime_options(config) -> None:
    """JAX settings that come from the config, applied before any JAX work: the CPU device split and the persistent
    compilation cache directory (local or gs://)."""
    cpu_devices = config.parallel.cpu_devices
    if cpu_devices is not None and cpu_devices >= 1:  # validate_config reports a bad value
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError as error:  # JAX already started in this process (e.g. main() called from a notebook)
            if len(jax.devices("cpu")) != cpu_devices:
                raise ValueError(
                    f"parallel.cpu_devices={cpu_devices} cannot take effect: JAX already started with "
                    f"{len(jax.devices('cpu'))} CPU devices in this process. Fix: run relcirc_jax.main "
                    "in a fresh process, or leave parallel.cpu_devices=None."
                ) from error
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)


def parse_flags(argv):
    """absl flag parsing; a bad --config (file, variant, override key or value) ends in one line (`fail`).
    `--config.*` overrides with --init_from=pretrained/NAME and no --config override that model's own config."""
    argv = config_checks.with_init_from_config(argv)
    problem = config_checks.config_file_problem(argv) or config_checks.overrides_without_config_problem(argv)
    if problem:
        fail(problem)
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, ValueError, SyntaxError) as error:  # absl's and ml_collections' for bad values
        explained = config_checks.explain_config_flags(argv)
        if explained is None and not isinstance(error, flags.Error):
            raise
        fail(explained or str(error))


def main_or_fail(argv):
    """`main`, with a UserError printed as its one line (`fail`) unless --verbosity asks for the traceback."""
    try:
        main(argv)
    except UserError as error:
        if FLAGS.verbosity >= 1:
            raise
        fail(str(error))


if __name__ == "__main__":
    app.run(main_or_fail, flags_parser=parse_flags)
