"""The DDPM noise schedule PixArt-alpha trains with: 1000 steps, betas linear from 1e-4 to 0.02.

The schedule is computed once in float64 numpy (as IDDPM/PixArt do) and handed to jitted code as float32.
Conventions (VP diffusion): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with
  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
and the variance-exploding noise level that diffusers' schedulers call "sigma" is sqrt((1 - abar_t) / abar_t).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float64 betas, linear from BETA_START to BETA_END (scaled like IDDPM's "linear" when T != 1000)."""
    scale = 1000 / num_train_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_train_timesteps, dtype=np.float64)


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float64 abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1."""
    return np.cumprod(1.0 - linear_betas(num_train_timesteps))


def ve_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """float64 sqrt((1 - abar_t) / abar_t): the noise level diffusers' samplers step through."""
    abar = alphas_cumprod(num_train_timesteps)
    return np.sqrt((1.0 - abar) / abar)


class Schedule(NamedTuple):
    """float32 per-timestep tables for jitted training code (a pytree, so it can be passed into jit)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def linear_schedule(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """The training tables (forward process and the IDDPM posterior q(x_{t-1} | x_t, x0)), float64 -> float32."""
    betas = linear_betas(num_train_timesteps)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t=0; IDDPM clips its log to the t=1 value.
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    tables = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
    )
    return Schedule(**{name: jnp.asarray(value, jnp.float32) for name, value in tables.items()})
