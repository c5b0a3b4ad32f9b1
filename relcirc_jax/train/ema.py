"""Exponential moving average of parameters (the weights used for sampling)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """Returns decay * ema + (1 - decay) * params, leaf by leaf, in the EMA's dtypes; jittable."""

    def update(ema, param):
        return (decay * ema + (1.0 - decay) * param.astype(ema.dtype)).astype(ema.dtype)

    return jax.tree.map(update, ema_params, params)


def warmup_decay(step: int | jax.Array, max_decay: float) -> jax.Array:
    """min(max_decay, (1 + step) / (10 + step)): early EMAs follow the fast-moving weights instead of the init."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))
