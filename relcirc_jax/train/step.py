"""One training step (caption dropout -> diffusion loss, a teacher's target if distilling, gradients accumulated
over microbatches if asked -> optimizer -> EMA), compiled ahead of time with shardings."""

import dataclasses
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from relcirc_jax import diffusion
from relcirc_jax.models import arch
from relcirc_jax.parallel import rules as sharding_rules
from relcirc_jax.train import distill, ema
from relcirc_jax.train.state import TrainState, compute_dtype, learning_rate

# The batch fields the step reads; the rest of a dataset batch (labels for analyses) stays on the host.
STEP_BATCH_KEYS = ("image", "ids", "mask", "caption_index")
_STEP_STREAM = 1  # fold-in tag separating the per-step random stream from parameter initialisation


class StepDraws(NamedTuple):
    """All randomness of one update, drawn per example for the whole batch (microbatches slice it like the batch)."""

    null_caption_rows: jax.Array  # bool [B]: caption dropout, these rows see the learned null caption
    noising: diffusion.Noising  # timesteps [B] and noise [B, H, W, C]


def draw_step(config: ml_collections.ConfigDict, key: jax.Array, image_shape: tuple[int, ...]) -> StepDraws:
    """The caption dropout, timesteps and noise of an update with PRNG key `key` (step_key's) for images of
    `image_shape`, by the recipe in config.train."""
    recipe = config.train
    drop_key, loss_key = jax.random.split(key)
    high_noise = (
        (recipe.t_high_noise_share, recipe.t_high_noise_logit_mean, recipe.t_logit_std)
        if recipe.t_high_noise_share
        else None
    )
    return StepDraws(
        null_caption_rows=jax.random.bernoulli(drop_key, recipe.caption_dropout, image_shape[:1]),
        noising=diffusion.draw_noising(
            loss_key,
            image_shape,
            timestep_logit_normal=None if recipe.t_logit_mean is None else (recipe.t_logit_mean, recipe.t_logit_std),
            high_noise=high_noise,
        ),
    )


def make_loss_fn(
    config: ml_collections.ConfigDict, model_cfg: arch.ModelConfig, teacher_cfg: arch.ModelConfig | None = None
) -> Callable:
    """loss_fn(params, batch, text, text_mask, draws, teacher_params=None) -> (loss, aux): the diffusion loss of the
    batch with draw_step's `draws` (caption dropout, timesteps, noise); with `teacher_cfg` (distill.py), its target
    mixes in that teacher's prediction."""
    model = arch.module(model_cfg)
    teacher = None if teacher_cfg is None else arch.module(teacher_cfg)

    def loss_fn(params, batch, text, text_mask, draws: StepDraws, teacher_params=None):
        def denoiser(module, weights):  # the student and the teacher read the same caption and null-caption rows
            return lambda x_t, t: module.apply(
                {"params": weights}, x_t, t, text, text_mask, null_caption_rows=draws.null_caption_rows
            )

        return diffusion.diffusion_loss(
            denoiser(model, params),
            batch["image"],
            draws.noising,
            learn_sigma=model_cfg.learn_sigma,
            prediction=model_cfg.prediction,
            teacher_fn=None if teacher is None else denoiser(teacher, teacher_params),
            teacher_weight=config.train.teacher_weight,
        )

    return loss_fn


def mean_loss_and_grads(loss_fn: Callable, params, examples, microbatches: int = 1, teacher_params=None):
    """(loss, d loss / d params) of loss_fn(params, *examples, teacher_params) over the batch `examples` (a tuple of
    pytrees, every leaf with a leading batch axis), taken over `microbatches` equal slices one after another (a
    lax.scan) and averaged: the whole batch's numbers up to float rounding, with one slice's activations in memory.
    Slice i holds examples i, i + microbatches, i + 2 * microbatches, ..., so each keeps the batch's split over the
    data-parallel devices."""
    value_and_grad = jax.value_and_grad(lambda p, ex: loss_fn(p, *ex, teacher_params)[0])
    if microbatches == 1:
        return value_and_grad(params, examples)

    def split(x):  # [B, ...] -> [microbatches, B / microbatches, ...]
        return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)

    def add_slice(total, slice_examples):
        return jax.tree.map(jnp.add, total, value_and_grad(params, slice_examples)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(add_slice, zeros, jax.tree.map(split, examples))
    return jax.tree.map(lambda x: x / microbatches, total)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The PRNG key of all randomness of update `step` (caption dropout, timesteps, noise)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _STEP_STREAM), step)


def make_train_step(
    config: ml_collections.ConfigDict,
    model_cfg: arch.ModelConfig,
    conditioner,
    tx: optax.GradientTransformation,
    teacher_cfg: arch.ModelConfig | None = None,
) -> Callable:
    """train_step(state, batch, tables, teacher_params=None) -> (new state, {"loss", "grad_norm", "lr"}).

    All randomness comes from step_key(config.seed, state.step), so a resumed or rerun step is bitwise the same, and it
    depends neither on how the batch is sharded nor (up to float rounding) on config.train.microbatches.
    `teacher_cfg` and `teacher_params`: distill.Teacher's, when distilling. The model computes in the train step's
    dtype (state.compute_dtype: train.compute_dtype="auto" may train in bfloat16 and sample in float32).
    """
    model_cfg = dataclasses.replace(model_cfg, dtype=compute_dtype(config, training=True))
    loss_fn = make_loss_fn(config, model_cfg, teacher_cfg)
    schedule = learning_rate(config)

    def train_step(state: TrainState, batch, tables, teacher_params=None):
        text, text_mask = conditioner.embed(tables, batch)
        draws = draw_step(config, step_key(config.seed, state.step), batch["image"].shape)
        loss, grads = mean_loss_and_grads(
            loss_fn, state.params, (batch, text, text_mask, draws), config.train.microbatches, teacher_params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            step=state.step + 1,
            ema_params=ema.ema_update(state.ema_params, params, ema_decay(config, state.step)),
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}

    return train_step


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array):
    """train.ema_decay, or its warm-up min(ema_decay, (1+step)/(10+step)) when train.ema_warmup."""
    if config.train.ema_warmup:
        return ema.warmup_decay(step, config.train.ema_decay)
    return config.train.ema_decay


def compile_train_step(setup, batch, teacher: distill.Teacher | None = None):
    """AOT-compiles the train step of `setup` (a state.RunSetup) for the shapes of `batch` (arrays or
    ShapeDtypeStructs): state donated, batch over ("data", "fsdp"), tables replicated, the teacher's params (when
    distilling) as placed. Call it as compiled(state, batch, tables, teacher.params). Logs the compile time."""
    mesh, state_shardings = setup.mesh, setup.state_shardings
    teacher_cfg, teacher_params = (None, None) if teacher is None else teacher
    train_step = make_train_step(setup.config, setup.model_cfg, setup.conditioner, setup.tx, teacher_cfg)
    batch_shardings = {k: sharding_rules.batch_sharding(mesh) for k in batch}
    tables_sharding = jax.tree.map(lambda _: sharding_rules.replicated(mesh), setup.tables)
    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, tables_sharding, teacher_shardings),
        out_shardings=(state_shardings, sharding_rules.replicated(mesh)),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    compiled = jitted.lower(setup.abstract_state, batch, setup.tables, teacher_params).compile()
    logging.info("Compiled the train step in %.1f s.", time.perf_counter() - start)
    return compiled
