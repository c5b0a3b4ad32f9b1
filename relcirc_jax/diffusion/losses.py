"""The training objective: the MSE of an eps-, v- or x0-prediction (parameterization.py), plus IDDPM's variational
bound term when the model learns sigma.

diffusion_loss is the one function the trainer calls, on the timesteps and noise of draw_noising (drawn for a whole
batch, so that microbatches can slice the same draws). With learn_sigma the model returns 2C channels (last axis):
its prediction and an interpolation value v in [-1, 1] between log(beta_t) and the clipped log posterior variance
(IDDPM's "learned_range", which PixArt uses). As in IDDPM, the VLB term sees a stop-gradient copy of eps, so it trains
only the variance and the MSE alone trains the mean. Images are channel-last in [-1, 1].
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.diffusion import parameterization
from relcirc_jax.diffusion.schedules import Schedule, linear_schedule

DenoiserFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> the model's prediction (eps, x0 or v)


class Noising(NamedTuple):
    """The random part of one loss evaluation, per example."""

    t: jax.Array  # int32 [B]: integer timesteps
    noise: jax.Array  # float32, the images' shape [B, ...]: the Gaussian noise added to them


def _per_example(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """table[t] shaped [B, 1, ..., 1] to broadcast against `like`."""
    return table[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def sample_timesteps(
    key: jax.Array,
    batch: int,
    num_timesteps: int = 1000,
    logit_normal: tuple[float, float] | None = None,
    high_noise: tuple[float, float, float] | None = None,
) -> jax.Array:
    """Integer timesteps in [0, num_timesteps), int32 [batch]: uniform, or with `logit_normal=(mean, std)`
    t = floor(num_timesteps * sigmoid(N(mean, std))) (SD3's logit-normal, over t / num_timesteps). With
    `high_noise=(share, mean, std)` each timestep is instead drawn logit-normal around that mean with probability share
    (a mixture that puts more of the training at the high noise levels)."""
    if high_noise is None:
        return _draw_timesteps(key, batch, num_timesteps, logit_normal)
    base_key, choice_key, high_key = jax.random.split(key, 3)
    share, mean, std = high_noise
    high = jax.random.bernoulli(choice_key, share, (batch,))
    base = _draw_timesteps(base_key, batch, num_timesteps, logit_normal)
    return jnp.where(high, _draw_timesteps(high_key, batch, num_timesteps, (mean, std)), base)


def _draw_timesteps(key, batch, num_timesteps, logit_normal):
    if logit_normal is None:
        return jax.random.randint(key, (batch,), 0, num_timesteps, dtype=jnp.int32)
    mean, std = logit_normal
    u = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
    return jnp.minimum(jnp.floor(u * num_timesteps), num_timesteps - 1).astype(jnp.int32)


def q_sample(x0: jax.Array, noise: jax.Array, t: jax.Array, schedule: Schedule) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for integer t of shape [B]."""
    abar = _per_example(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all dimensions, in float32 (of whichever target the model predicts)."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) for x in [-1, 1] quantised to 256 levels (IDDPM's decoder term at t = 0)."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vlb_term(
    eps: jax.Array, v: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, schedule: Schedule
) -> jax.Array:
    """Per-example VLB in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0.

    eps should already be stop-gradient (IDDPM's frozen mean); gradients reach only v.
    """
    per = lambda table: _per_example(table, t, x0)  # noqa: E731
    abar = per(schedule.alphas_cumprod)
    coef1, coef2 = per(schedule.posterior_mean_coef1), per(schedule.posterior_mean_coef2)
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_var = per(schedule.posterior_log_variance_clipped)

    x0_pred = (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    model_mean = coef1 * x0_pred + coef2 * x_t
    frac = (v + 1.0) / 2.0
    model_log_var = frac * jnp.log(per(schedule.betas)) + (1.0 - frac) * true_log_var

    reduce_axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(_normal_kl(true_mean, true_log_var, model_mean, model_log_var), axis=reduce_axes) / np.log(2.0)
    decoder_nll = -jnp.mean(
        _discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var), axis=reduce_axes
    ) / np.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)


def draw_noising(
    key: jax.Array,
    shape: tuple[int, ...],
    num_timesteps: int = 1000,
    timestep_logit_normal: tuple[float, float] | None = None,
    high_noise: tuple[float, float, float] | None = None,
) -> Noising:
    """Timesteps (sample_timesteps(timestep_logit_normal, high_noise)) and noise for a batch of images of `shape`."""
    t_key, noise_key = jax.random.split(key)
    t = sample_timesteps(t_key, shape[0], num_timesteps, timestep_logit_normal, high_noise)
    return Noising(t, jax.random.normal(noise_key, shape, jnp.float32))


def diffusion_loss(
    denoiser_fn: DenoiserFn,
    x0: jax.Array,
    noising: Noising,
    *,
    learn_sigma: bool = False,
    schedule: Schedule | None = None,
    prediction: str = "eps",
    teacher_fn: DenoiserFn | None = None,
    teacher_weight: float = 1.0,
) -> tuple[jax.Array, dict]:
    """(scalar loss, aux) for a batch x0 [B, ...] noised by `noising` (draw_noising's, with the schedule's
    num_timesteps); denoiser_fn(x_t, t) gets t as float32 integer values [B].

    `prediction` says what denoiser_fn's first C channels predict ("eps", "v" or "x0", see parameterization.py); the
    MSE is taken against that target. aux holds "mse" and, with learn_sigma, "vb" (batch means) for logging.

    With `teacher_fn` (a trained model predicting the same quantity; distillation), the target is
    (1 - teacher_weight) * the data's + teacher_weight * teacher_fn(x_t, t)'s first C channels (no gradient): one
    squared error, so the gradient is that of teacher_weight * MSE(teacher) + (1 - teacher_weight) * MSE(data).
    """
    parameterization.check_prediction(prediction)
    schedule = linear_schedule() if schedule is None else schedule
    t, noise = noising
    x_t = q_sample(x0.astype(jnp.float32), noise, t, schedule)
    out = denoiser_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)

    channels = x0.shape[-1]
    expected = 2 * channels if learn_sigma else channels
    if out.shape[-1] != expected:
        raise ValueError(
            f"denoiser_fn returned {out.shape[-1]} channels but learn_sigma={learn_sigma} with {channels}-channel "
            f"images needs {expected}; set learn_sigma to match the model's output channels."
        )
    abar = _per_example(schedule.alphas_cumprod, t, x0)
    target = parameterization.training_target(prediction, x0.astype(jnp.float32), noise, abar)
    if teacher_fn is not None:
        taught = jax.lax.stop_gradient(teacher_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)[..., :channels])
        target = (1.0 - teacher_weight) * target + teacher_weight * taught
    if not learn_sigma:
        mse = mse_loss(out, target)
        return mse, {"mse": mse}
    pred, v = out[..., :channels], out[..., channels:]
    mse = mse_loss(pred, target)
    eps = parameterization.to_eps(prediction, pred, x_t, abar)
    vb = jnp.mean(vlb_term(jax.lax.stop_gradient(eps), v, x0.astype(jnp.float32), x_t, t, schedule))
    return mse + vb, {"mse": mse, "vb": vb}
