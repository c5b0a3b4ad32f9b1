"""relcirc_jax.models: the PixArt DiT (dit.py), its attention with capture points and head masks (attention.py),
and the diffusers checkpoint converter (convert.py)."""

from relcirc_jax.models.convert import diffusers_to_flax, flax_to_diffusers, load_pixart_checkpoint
from relcirc_jax.models.dit import (
    DIT_SIZES,
    DiT,
    DiTConfig,
    dit_config,
    hook_names,
    init_params,
    logical_specs,
    null_caption,
    run_with_cache,
)

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTConfig",
    "dit_config",
    "hook_names",
    "init_params",
    "logical_specs",
    "null_caption",
    "run_with_cache",
    "diffusers_to_flax",
    "flax_to_diffusers",
    "load_pixart_checkpoint",
]
