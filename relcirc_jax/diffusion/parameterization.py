"""What the network predicts: eps (PixArt's default), v (Salimans & Ho 2022) or x0, and the conversion back to eps.

Samplers and guidance speak eps. In pixel space an eps-network must reproduce its 192-value input patch almost exactly
at high noise, because x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) multiplies its error by up to 1/sqrt(abar_999) ~ 156;
a short CPU run never gets there and samples saturate. v = sqrt(abar) eps - sqrt(1-abar) x0 is ~ -x0 at high noise and
~ eps at low noise, so neither end amplifies errors, but like eps it asks the network to output full-dimensional noise.
x0 asks only for the clean image, which lies on a low-dimensional manifold: with large pixel patches (a 192-value patch
through a 192-wide DiT) that is the prediction that learns (Li & He 2025, "Back to Basics: Let Denoising Generative
Models Denoise"); eps- and v-networks of that shape draw patch-sized noise texture. Identities used
(x_t = sqrt(abar) x0 + sqrt(1-abar) eps):
  eps = sqrt(abar) v + sqrt(1-abar) x_t;   eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from relcirc_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS, ve_sigmas

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction type {prediction!r}; choose one of {PREDICTIONS}.")


def alphas_cumprod_at(t: jax.Array) -> jax.Array:
    """abar at (possibly fractional) timesteps, interpolating the noise level sigma linearly in t like diffusers."""
    sigma = jnp.interp(
        t.astype(jnp.float32), jnp.arange(NUM_TRAIN_TIMESTEPS, dtype=jnp.float32), jnp.asarray(ve_sigmas(), jnp.float32)
    )
    return 1.0 / (1.0 + sigma**2)


def training_target(prediction: str, x0: jax.Array, noise: jax.Array, abar: jax.Array) -> jax.Array:
    """The regression target for the network: noise, v = sqrt(abar) noise - sqrt(1-abar) x0, or x0."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def to_eps(prediction: str, out: jax.Array, x_t: jax.Array, abar: jax.Array) -> jax.Array:
    """Converts the network's prediction of `out` at x_t (noise level abar) to eps."""
    check_prediction(prediction)
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - jnp.sqrt(abar) * out) / jnp.sqrt(1.0 - abar)
    return jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * x_t


def eps_fn_from(model_fn: Callable, prediction: str, *, has_aux: bool = False) -> Callable:
    """Wraps model_fn(x, t) -> prediction (C or 2C channels) into eps_fn(x, t) for the samplers.

    Extra channels (learned variance) pass through unchanged; with has_aux, model_fn returns (prediction, aux) and
    eps_fn (eps, aux). CFG may be applied before or after this wrapper: the
    conversion is affine in the prediction, so guiding v and guiding eps give the same eps.
    """
    check_prediction(prediction)
    if prediction == "eps":
        return model_fn

    def eps_fn(x, t):
        out, aux = model_fn(x, t) if has_aux else (model_fn(x, t), None)
        c = x.shape[-1]
        abar = alphas_cumprod_at(jnp.broadcast_to(t, x.shape[:1])).reshape((-1,) + (1,) * (x.ndim - 1))
        eps = jnp.concatenate([to_eps(prediction, out[..., :c], x, abar), out[..., c:]], axis=-1)
        return (eps, aux) if has_aux else eps

    return eps_fn
