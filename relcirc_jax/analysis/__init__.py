"""relcirc_jax.analysis."""
