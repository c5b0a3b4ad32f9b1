"""The training loop, top to bottom: set up, resume, then per step data -> compiled step -> logs, samples, evals, saves.

A run is resumable at any checkpoint and bitwise reproducible: the data of step s and all randomness of the step are
functions of (seed, s), and the state is restored exactly. A non-finite loss stops the run with an error naming the
step before anything is saved, so the last checkpoint stays good. SIGTERM saves a checkpoint and returns normally
(no sampling or evaluation in the grace period); so does a spent `train.time_budget_minutes`, which also samples and
evaluates the last step (the end of its learning curve) after saving it. A checkpoint of another model than the config
describes (say, another text encoder of the same shapes) stops the run with an error before config.json is written.
"""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from relcirc_jax import pretrained
from relcirc_jax.data import dataset
from relcirc_jax.models import cpu_bf16_matmul
from relcirc_jax.parallel.host_data import local_rows, to_global
from relcirc_jax.train import distill, evaluate, preemption, sampling
from relcirc_jax.train import state as train_state
from relcirc_jax.train import step as train_step
from relcirc_jax.train.metrics import MetricWriter
from relcirc_jax.train.progress import ProgressLogger


def train(config: ml_collections.ConfigDict, workdir, *, devices=None) -> train_state.TrainState:
    """Trains (or resumes) the run in `workdir` to config.train.num_steps; returns the final state."""
    workdir = epath.Path(workdir)
    setup = train_state.build_run_setup(config, workdir, devices)
    state, start = _init_or_restore(setup)
    write_config(config, workdir)  # after the checkpoint, if any, was found to be this config's model
    writer = MetricWriter(workdir, is_primary=jax.process_index() == 0)
    try:
        return _run(setup, state, start, writer)
    finally:
        setup.checkpointer.wait()
        setup.checkpointer.close()
        writer.close()


def write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """The resolved config as workdir/config.json (machine-readable) and config.txt (as printed)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    (workdir / "config.txt").write_text(str(config))


def _init_or_restore(setup: train_state.RunSetup) -> tuple[train_state.TrainState, int]:
    train_state.check_model_before_restore(setup)
    restored = setup.checkpointer.restore_latest(setup.abstract_state, move_aside_unreadable=True)
    if restored is not None:
        step, state, meta = restored
        train_state.check_same_model(setup, step, meta)
        logging.info("Resumed from the checkpoint of step %d.", step)
        return state, step
    state = train_state.initial_state(setup)
    if setup.config.init_from:
        params = _reference_params(setup, state.params)
        # Two buffers: the train step donates the state, and one buffer donated twice crashes XLA.
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        logging.info("Initialised the weights and their EMA from the reference model %s.", setup.config.init_from)
    return state, 0


def _reference_params(setup: train_state.RunSetup, init_params):
    """The reference model's weights on the mesh; with config.init_transfer, only those that fit the new model."""
    if not setup.config.init_transfer:
        return train_state.ema_weights(setup, setup.checkpointer.directory.parent)[1]
    params, fresh = pretrained.transfer(pretrained.load(setup.config.init_from)[1], init_params)
    logging.info("init_transfer: kept the random init of %s.", ", ".join(fresh))
    return train_state.place_params(setup, params)


def _run(
    setup: train_state.RunSetup, state: train_state.TrainState, start: int, writer: MetricWriter
) -> train_state.TrainState:
    config = setup.config
    total = config.train.num_steps
    if start >= total:
        logging.info("The checkpoint of step %d already reaches train.num_steps=%d; nothing to train.", start, total)
        return state
    # Compilation counts against the budget: it is part of the wait. Several processes agree on log steps.
    budget = preemption.TimeBudget(config.train.time_budget_minutes, sync_every=config.log.every_steps)
    teacher = distill.load_teacher(setup)
    teacher_params = None if teacher is None else teacher.params
    if teacher is not None:
        logging.info(distill.describe(teacher, config))
    step_fn = train_step.compile_train_step(setup, _global_batch(config, setup.mesh, start), teacher)
    progress = ProgressLogger(total, config.train.batch_size, config.log.every_steps, seconds_left=budget.seconds_left)
    periodic = _PeriodicSampling(setup)
    stop = preemption.install_sigterm_handler()
    pending = []  # (step, device metrics) not yet checked for finiteness
    logging.info(
        "Training %s-%s (%.2fM params) on mesh %s, steps %d -> %d, batch %d, time budget %s.",
        "MM-DiT" if config.model.arch == "mmdit" else "DiT",
        config.model.size,
        sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
        dict(setup.mesh.shape),
        start,
        total,
        config.train.batch_size,
        _budget_text(config.train.time_budget_minutes, budget.seconds_left()),
    )
    dtype = train_state.compute_dtype(config, training=True)
    logging.info("The train step computes in %s (train.compute_dtype=%s).", dtype, config.train.compute_dtype)
    if jax.default_backend() == "cpu" and (dtype == "bfloat16" or config.train.compute_dtype == "auto"):
        on, why = cpu_bf16_matmul.status()
        logging.info("bfloat16 Dense products on the CPU: %s.", why if on else f"XLA's dot ({why})")
    for step in range(start, total):
        state, metrics = step_fn(state, _global_batch(config, setup.mesh, step), setup.tables, teacher_params)
        done = step + 1
        pending.append((done, metrics))
        preempted = stop.should_stop(done)
        out_of_time = budget.spent(done)
        # An evaluated step is saved too, so every point of the eval curve can be analysed again (--step=N).
        saving = (
            done % config.checkpoint.every_steps == 0
            or done % config.eval.every_steps == 0
            or done == total
            or preempted
            or out_of_time
        )
        if saving or periodic.due(done) or done % config.log.every_steps == 0:
            _check_finite(pending, setup)
            writer.scalars(done, _window_metrics(pending))
            progress.update(done, metrics["loss"], metrics["grad_norm"])
            pending = []
        if saving:  # before sampling and evaluating: a failure or a hard kill there must not lose the step
            setup.checkpointer.save(done, state, _meta(config, done), force=True)
        if not preempted:  # a preemption's grace period is for the save
            periodic(state, done, writer, final=out_of_time)
        if preempted:
            logging.warning("Preempted: saved the checkpoint of step %d; stopping.", done)
            break
        if out_of_time:
            logging.warning(
                "train.time_budget_minutes=%g spent: saved and evaluated the checkpoint of step %d; "
                "stopping before train.num_steps=%d (rerun to resume).",
                config.train.time_budget_minutes,
                done,
                total,
            )
            break
    return state


def _budget_text(minutes: float | None, seconds_left: float | None) -> str:
    """The time budget as the start-up log states it: its length and the clock time training stops by (from the
    budget's own deadline, which compilation has already eaten into)."""
    if seconds_left is None:  # no budget: None, or inf from an API caller (the CLI already turned inf into None)
        return "none"
    stop = time.strftime("%H:%M", time.localtime(time.time() + seconds_left))
    return f"{minutes:g} min (training stops by {stop} at the latest, then samples and evaluates its last step)"


def _global_batch(config: ml_collections.ConfigDict, mesh, step: int) -> dict:
    curriculum = step < config.data.curriculum_steps
    make_slice = lambda k, n: dataset.train_batch(  # noqa: E731
        config.seed,
        step,
        global_batch=config.train.batch_size,
        process_index=k,
        process_count=n,
        size=config.data.image_size,
        radius=config.data.radius,
        task=config.data.task,
        caption_mix=config.data.curriculum_caption_mix if curriculum else config.data.caption_mix,
        relations=config.data.relations,
        num_scenes=config.data.num_scenes,
    )
    local = local_rows(mesh, config.train.batch_size, make_slice)
    return to_global({k: local[k] for k in train_step.STEP_BATCH_KEYS}, mesh)


def _check_finite(pending: list, setup: train_state.RunSetup) -> None:
    for step, metrics in pending:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise FloatingPointError(
                f"Non-finite training loss {loss} (grad norm {grad_norm}) at step {step}. The run stopped without "
                f"saving this state; the last good checkpoint (step {setup.checkpointer.latest_step()}) in "
                f"{setup.checkpointer.directory} is intact. Fix: lower train.lr or tighten train.grad_clip, "
                "then rerun to resume from it."
            )


def _window_metrics(pending: list) -> dict[str, float]:
    """Loss averaged over the steps since the last log; grad norm and lr of the last step."""
    last = pending[-1][1]
    return {
        "loss": float(np.mean([float(m["loss"]) for _, m in pending])),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]),
    }


def _meta(config: ml_collections.ConfigDict, step: int) -> dict:
    return {"step": step, "data_position": step, "seed": config.seed, "config": config.to_dict()}


class _PeriodicSampling:
    """Sample grids of the fixed prompts and evaluations of the eval set, with EMA params, when their steps come."""

    def __init__(self, setup: train_state.RunSetup):
        self.setup = setup
        config = setup.config
        self.grid_captions = sampling.fixed_prompts(config)
        self.eval_captions = evaluate.eval_captions(config)
        self._samplers = {}  # batch size -> Sampler, compiled on first use

    def due(self, step: int) -> bool:
        config = self.setup.config
        return step % config.sample.every_steps == 0 or step % config.eval.every_steps == 0

    def __call__(self, state: train_state.TrainState, step: int, writer: MetricWriter, *, final: bool = False) -> None:
        """Samples and evaluates when their steps come, or in any case when `final`."""
        config = self.setup.config
        if step % config.sample.every_steps == 0 or final:
            images = self._sampler(len(self.grid_captions))(state.ema_params, self.setup.tables, self.grid_captions)
            writer.image(step, "samples", sampling.image_grid(images))
        if step % config.eval.every_steps == 0 or final:
            images = self._sampler(config.eval.batch_size)(state.ema_params, self.setup.tables, self.eval_captions)
            accuracies = evaluate.summary(evaluate.score_images(images, self.eval_captions)[0])
            writer.scalars(step, accuracies)
            logging.info("Eval at step %d: %s", step, {k: round(v, 3) for k, v in accuracies.items()})

    def _sampler(self, batch_size: int) -> sampling.Sampler:
        if batch_size not in self._samplers:
            self._samplers[batch_size] = sampling.make_sampler(self.setup, batch_size)
        return self._samplers[batch_size]
