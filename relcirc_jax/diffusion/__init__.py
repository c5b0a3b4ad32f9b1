"""relcirc_jax.diffusion."""
