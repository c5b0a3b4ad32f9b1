"""relcirc_jax.parallel."""
