"""relcirc_jax.models."""
