"""relcirc_jax.data."""
