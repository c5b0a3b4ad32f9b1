"""relcirc_jax: train text-to-image Diffusion Transformers on synthetic relation scenes and analyse their circuits."""

__version__ = "0.1.0"
