"""Classifier-free guidance with the null caption, as one batched model call per step.

guided = uncond + scale * (cond - uncond), of whatever the model predicts (eps, x0 or v: the guidance is affine, so
guiding any of them and converting to eps afterwards, diffusion/parameterization.py, is the same). With a
learned-sigma model (2C output channels) only the first C channels are guided and the conditional half's variance
channels are passed through, as PixArt does; the samplers read only the first C.
"""

from typing import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def cfg_denoiser_fn(
    model_fn: ModelFn,
    text: jax.Array,
    text_mask: jax.Array,
    null_text: jax.Array,
    null_mask: jax.Array,
    scale,
    *,
    has_aux: bool = False,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """denoiser(x, t) -> the guided prediction; model_fn(x, t, text, mask) -> the model's prediction (eps, x0 or v),
    text [B, L, D], mask [B, L].

    scale: a number, or scale(t) -> per-row scales [B] (interval guidance, a traced CFG sweep).
    null_text / null_mask may have batch 1 (or B); they are broadcast to text's shape. With has_aux, model_fn returns
    (prediction, aux) and so does the denoiser; aux is of the doubled batch, the conditional half first.
    """
    null_text = jnp.broadcast_to(null_text, text.shape).astype(text.dtype)
    null_mask = jnp.broadcast_to(null_mask, text_mask.shape).astype(text_mask.dtype)
    both_text = jnp.concatenate([text, null_text])
    both_mask = jnp.concatenate([text_mask, null_mask])

    def denoiser(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_text, both_mask)
        out, aux = out if has_aux else (out, None)
        cond, uncond = jnp.split(out, 2)
        channels = x.shape[-1]
        s = scale(t).reshape((-1,) + (1,) * (x.ndim - 1)).astype(cond.dtype) if callable(scale) else scale
        guided = uncond[..., :channels] + s * (cond[..., :channels] - uncond[..., :channels])
        guided = jnp.concatenate([guided, cond[..., channels:]], axis=-1)
        return (guided, aux) if has_aux else guided

    return denoiser
