"""The diversity baselines the contextual repulsion is compared with, in the same sampler (notes 3.2, 5.2-5.4, 6.4):
each is a pure function of arrays that sampling.generate_fn applies when its knob is among the `interventions`, so a
sweep of a knob compiles once (and can be vmapped, as analysis/interventions.py does).

    knob (interventions key)   shape        method
    cfg_scale                  []           the CFG scale itself (the i.i.d. "CFG sweep" every method must beat)
    guidance_window            [2]          interval guidance (Kynkaanniemi et al. 2024): CFG only at model
                                            timesteps in [t_lo, t_hi], scale 1 (the conditional prediction) elsewhere
    pg_coeff                   []           latent particle guidance (Corso et al. 2024): within each group of
                                            `group_size` samples, eps_i <- eps_i - coeff sigma_t sum_j k_ij (x_i - x_j)
                                            / s^2, k_ij = exp(-|x_i - x_j|^2 / (2 s^2)), s the PG median bandwidth,
                                            sigma_t = sqrt((1 - abar) / abar), only while sigma_t > 1 (their
                                            reference code's pixel-space cut)
    cads                       [4]          CADS (Sadat et al. 2024): (s, tau1, tau2, psi); the conditional caption
                                            embedding y <- sqrt(gamma) y + s sqrt(1 - gamma) n with fresh noise n per
                                            sample and step, gamma = 1 for tau <= tau1, 0 for tau >= tau2, linear
                                            between (tau = t / 1000, 1 = pure noise), then moment rescaling mixed in
                                            with weight psi; the negative caption is left alone
"""

import jax
import jax.numpy as jnp

from relcirc_jax.analysis import diversity
from relcirc_jax.analysis.repulsion import check_groups
from relcirc_jax.diffusion.parameterization import alphas_cumprod_at
from relcirc_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS

KNOBS = ("cfg_scale", "guidance_window", "pg_coeff", "cads")
PG_SIGMA_BREAK = 1.0  # particle guidance acts while sigma_t exceeds this (their pixel-space setting)
_CADS_STREAM = 7  # fold-in tag of CADS's noise, apart from the sampler's starting noise


def guidance_scale(scale, t: jax.Array, window=None) -> jax.Array:
    """Per-row CFG scale [B] at timesteps t [B]: `scale` inside `window` (inclusive; everywhere without one), 1
    outside."""
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), t.shape)
    if window is None:
        return scale
    inside = (t >= window[0]) & (t <= window[1])
    return jnp.where(inside, scale, 1.0)


def particle_guidance(eps: jax.Array, x: jax.Array, t: jax.Array, coeff, group_size: int) -> jax.Array:
    """eps [B, ...] with latent particle guidance's repulsion within groups of `group_size` consecutive rows of x."""
    batch = x.shape[0]
    check_groups(batch, group_size, "A particle guidance")
    flat = x.astype(jnp.float32).reshape(batch // group_size, group_size, -1)

    def push(group):  # sum_j k_ij (x_i - x_j) / s^2
        s = diversity.rbf_bandwidth(group, rule="pg")
        k = diversity.kernel_matrix(group, "rbf", bandwidth=s)
        return (jnp.sum(k, axis=1, keepdims=True) * group - k @ group) / (s * s)

    force = jax.vmap(push)(flat).reshape(eps.shape[:1] + x.shape[1:])
    abar = alphas_cumprod_at(t)
    sigma = jnp.sqrt((1.0 - abar) / abar)
    weight = jnp.where(sigma > PG_SIGMA_BREAK, coeff * sigma, 0.0).reshape((-1,) + (1,) * (x.ndim - 1))
    channels = x.shape[-1]
    moved = eps[..., :channels] - (weight * force).astype(eps.dtype)
    return jnp.concatenate([moved, eps[..., channels:]], axis=-1)


def cads_gamma(t: jax.Array, tau1, tau2) -> jax.Array:
    """CADS's schedule gamma at model timesteps t: 1 at low noise (tau <= tau1), 0 at high noise (tau >= tau2)."""
    tau = t.astype(jnp.float32) / NUM_TRAIN_TIMESTEPS
    return jnp.clip((tau2 - tau) / jnp.maximum(tau2 - tau1, 1e-6), 0.0, 1.0)


def cads_condition(text: jax.Array, t: jax.Array, key: jax.Array, knobs: jax.Array) -> jax.Array:
    """text [B, L, D] annealed by CADS at timesteps t [B]; key [B] (one per row: draws differ per sample and step);
    knobs (s, tau1, tau2, psi). s = 0 returns text exactly."""
    s, tau1, tau2, psi = knobs[0], knobs[1], knobs[2], knobs[3]
    y = text.astype(jnp.float32)
    gamma = cads_gamma(t, tau1, tau2)[:, None, None]
    step = t.astype(jnp.int32)
    noise = jax.vmap(lambda k, i: jax.random.normal(jax.random.fold_in(k, i), y.shape[1:]))(key, step)
    noisy = jnp.sqrt(gamma) * y + s * jnp.sqrt(1.0 - gamma) * noise
    axes = (1, 2)
    rescaled = (noisy - jnp.mean(noisy, axes, keepdims=True)) / jnp.maximum(
        jnp.std(noisy, axes, keepdims=True), 1e-6
    ) * jnp.std(y, axes, keepdims=True) + jnp.mean(y, axes, keepdims=True)
    out = psi * rescaled + (1.0 - psi) * noisy
    return jnp.where(s > 0, out, y).astype(text.dtype)


def cads_keys(seed: int, noise_id: jax.Array) -> jax.Array:
    """One CADS key per row, from the sampling seed and the row's noise id (paired across methods like the noise)."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), _CADS_STREAM)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(noise_id)
