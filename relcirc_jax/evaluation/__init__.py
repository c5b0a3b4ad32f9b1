"""relcirc_jax.evaluation."""
