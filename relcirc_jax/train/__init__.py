"""relcirc_jax.train."""
