"""Tiny random DiTs shared by the analysis tests: a 16 px config and random weights in every layer."""

import jax
import numpy as np

from relcirc_jax.models.dit import DiTConfig

TINY = DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2, caption_channels=16, max_text_len=5)


def noisy(params, seed: int = 0):
    """Perturb every parameter so that zero-initialised layers (cross-attn out, proj_out) carry signal."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: leaf + 0.2 * rng.standard_normal(leaf.shape, np.float32), params)
