"""One entry point for both model families, chosen by `config.model.arch`: the PixArt cross-attention DiT (dit.py,
"pixart") and the SD3-style dual-stream MM-DiT (mmdit.py, "mmdit", parameter-matched to the PixArt size of the same
name). Training, sampling and the analyses build their model through these functions, so one code path serves both.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from relcirc_jax.models import dit, mmdit

ARCHS = ("pixart", "mmdit")
ModelConfig = dit.DiTConfig | mmdit.MMDiTConfig
parameter_count = mmdit.parameter_count  # of either family


def model_config(arch: str, size: str, **overrides) -> ModelConfig:
    """The config of size `size` of family `arch` with field overrides (an MM-DiT's default sizes are the ones
    parameter-matched to PixArt's, `mmdit.matched_size`)."""
    if arch == "pixart":
        return dit.dit_config(size, **overrides)
    if arch == "mmdit":
        return mmdit.mmdit_config(size, **overrides)
    raise ValueError(f"Unknown model arch {arch!r}; choose one of {ARCHS}.")


def arch_of(config: ModelConfig) -> str:
    """ "mmdit" for an MMDiTConfig, "pixart" for a DiTConfig."""
    return "mmdit" if isinstance(config, mmdit.MMDiTConfig) else "pixart"


def module(config: ModelConfig, capture: Sequence[str] = ()) -> nn.Module:
    """The Flax module of `config`, recording the capture points named in `capture` (see `hook_names`)."""
    cls = mmdit.MMDiT if arch_of(config) == "mmdit" else dit.DiT
    return cls(config, capture=tuple(capture))


def hook_names(config: ModelConfig) -> list[str]:
    """Every capture-point name of the model, in forward order."""
    return mmdit.hook_names(config) if arch_of(config) == "mmdit" else dit.hook_names(config)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Fresh float32 parameters as plain arrays (the inner "params" tree, without sharding boxes)."""
    return dit.init_model_params(module(config), rng)


def logical_specs(config: ModelConfig) -> Any:
    """PartitionSpecs of logical axis names, same tree as `init_params` (no compute, shapes only)."""
    return nn.get_partition_spec(dit.abstract_variables(module(config))["params"])


def run_with_cache(config: ModelConfig, params: Mapping, x, t, text, text_mask, names: Sequence[str], **kwargs):
    """Forward pass recording the named capture points: (output, {name: array}); kwargs go to the module's call."""
    return dit.capture_forward(module(config), hook_names(config), params, x, t, text, text_mask, names, **kwargs)
