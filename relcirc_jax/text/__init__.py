"""relcirc_jax.text."""
