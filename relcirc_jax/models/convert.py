"""Convert PixArt weights between diffusers' PixArtTransformer2DModel and our Flax DiT (and, at the end, MM-DiT
weights between diffusers' SD3Transformer2DModel and models/mmdit.py).

Name mapping (1:1, by rule): split the diffusers name on ".", glue each list index to the module before it
("transformer_blocks.3" -> "transformer_blocks_3", "to_out.0" -> "to_out_0", "net.0" -> "net_0") and rename the
leaf "weight" -> "kernel". Examples:
    pos_embed.proj.weight [D,C,p,p] (OIHW)        -> pos_embed/proj/kernel [p,p,C,D] (HWIO)
    transformer_blocks.3.attn1.to_q.weight [o,i]   -> transformer_blocks_3/attn1/to_q/kernel [i,o] (transposed)
    transformer_blocks.3.ff.net.0.proj.bias        -> transformer_blocks_3/ff/net_0/proj/bias
    transformer_blocks.3.scale_shift_table [6,D]   -> transformer_blocks_3/scale_shift_table (as is)
    adaln_single.emb.timestep_embedder.linear_1.*  -> adaln_single/emb/timestep_embedder/linear_1/*
The PixArt null caption `y_embedding` [max_text_len, caption_channels] has no diffusers counterpart: it is read
when the state dict has it and otherwise left at its initial value.
"""

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from relcirc_jax import hf_weights
from relcirc_jax.models import mmdit
from relcirc_jax.models.dit import DiT, DiTConfig, abstract_variables, scaled_normal

NULL_CAPTION = "y_embedding"
_LIST_MODULES = ("transformer_blocks", "to_out", "net")  # diffusers nn.ModuleList / nn.Sequential names
_INDEXED = re.compile(rf"^({'|'.join(_LIST_MODULES)})_(\d+)$")
WEIGHT_FILE = "diffusion_pytorch_model.safetensors"

# PixArtTransformer2DModel.__init__ defaults, for config.json files that omit a key.
_DIFFUSERS_DEFAULTS = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    attention_bias=True,
    sample_size=128,
    patch_size=2,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,
    use_additional_conditions=None,
    caption_channels=None,
    attention_type="default",
)
# Settings our DiT implements; anything else in a checkpoint's config is refused.
_REQUIRED = dict(
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    attention_bias=True,
    attention_type="default",
)


def diffusers_to_flax_path(name: str) -> tuple[str, ...]:
    """`transformer_blocks.3.attn1.to_out.0.weight` -> ("transformer_blocks_3", "attn1", "to_out_0", "kernel")."""
    path: list[str] = []
    for token in name.split("."):
        if token.isdigit() and path:
            path[-1] = f"{path[-1]}_{token}"
        else:
            path.append(token)
    if path[-1] == "weight":
        path[-1] = "kernel"
    return tuple(path)


def flax_path_to_diffusers(path: tuple[str, ...]) -> str:
    """Inverse of `diffusers_to_flax_path`."""
    tokens = []
    for part in path:
        match = _INDEXED.match(part)
        tokens += [match.group(1), match.group(2)] if match else [part]
    if tokens[-1] == "kernel":
        tokens[-1] = "weight"
    return ".".join(tokens)


def _param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {Flax path: shape} of a DiT / MM-DiT module's parameters (no compute)."""
    flat = traverse_util.flatten_dict(abstract_variables(model)["params"])
    return {path: tuple(getattr(leaf, "value", leaf).shape) for path, leaf in flat.items()}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, possibly bfloat16 (numpy has none)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _torch_to_flax_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def _flax_to_torch_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


def _convert_state_dict(
    state_dict: Mapping[str, Any], config, shapes: Mapping, to_name, also_allowed: set, hint: str
) -> dict[tuple[str, ...], np.ndarray]:
    """The parameters of `shapes` (flat {Flax path: shape}, null caption aside) read from a diffusers state dict whose
    names are `to_name(path)`, in Flax layouts. Refuses missing keys, keys outside the model and `also_allowed`, and
    wrong shapes; `hint` ends the missing/unexpected-keys error."""
    expected = {to_name(path): path for path in shapes if path != (NULL_CAPTION,)}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - {NULL_CAPTION} - also_allowed)
    if missing or unexpected:
        raise ValueError(
            f"State dict does not fit {config}: missing keys {missing}; unexpected keys {unexpected}. {hint}"
        )
    flat = {}
    for name, path in expected.items():
        array = _torch_to_flax_layout(_to_numpy(state_dict[name]), path)
        if array.shape != shapes[path]:
            raise ValueError(
                f"Parameter {name!r} has shape {array.shape} after conversion; the config needs "
                f"{shapes[path]}. The checkpoint and the config disagree on sizes."
            )
        flat[path] = array
    return flat


def _add_null_caption(flat: dict, state_dict: Mapping[str, Any], shapes: Mapping, rng: jax.Array | None) -> dict:
    """Adds `y_embedding` to `flat`, from the state dict or freshly drawn with `rng` (default key 0); unflattens."""
    if NULL_CAPTION in state_dict:
        flat[(NULL_CAPTION,)] = _to_numpy(state_dict[NULL_CAPTION])
        if flat[(NULL_CAPTION,)].shape != shapes[(NULL_CAPTION,)]:
            raise ValueError(
                f"y_embedding has shape {flat[(NULL_CAPTION,)].shape}; config needs "
                f"{shapes[(NULL_CAPTION,)]} (max_text_len, caption_channels)."
            )
    else:
        key = jax.random.key(0) if rng is None else rng
        flat[(NULL_CAPTION,)] = np.asarray(scaled_normal(1)(key, shapes[(NULL_CAPTION,)]))
    return traverse_util.unflatten_dict(flat)


def _to_state_dict(params: Mapping, to_name, include_null_caption: bool) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict named by `to_name(path)` (numpy, torch layouts)."""
    flat = traverse_util.flatten_dict(dict(params))
    return {
        to_name(path): _flax_to_torch_layout(np.asarray(value, np.float32), path)
        for path, value in flat.items()
        if include_null_caption or path != (NULL_CAPTION,)
    }


def diffusers_to_flax(state_dict: Mapping[str, Any], config: DiTConfig, rng: jax.Array | None = None) -> dict:
    """A diffusers PixArtTransformer2DModel state dict (torch tensors or numpy) -> float32 Flax params.

    `rng` seeds the null caption when the state dict has no `y_embedding` (default key 0).
    """
    shapes = _param_shapes(DiT(config))
    hint = "Check that the checkpoint is a PixArtTransformer2DModel with these sizes (no size/aspect conditions)."
    flat = _convert_state_dict(state_dict, config, shapes, flax_path_to_diffusers, set(), hint)
    return _add_null_caption(flat, state_dict, shapes, rng)


def flax_to_diffusers(params: Mapping, include_null_caption: bool = False) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict (numpy, torch layouts); the null caption only when asked for."""
    return _to_state_dict(params, flax_path_to_diffusers, include_null_caption)


def dit_config_from_diffusers(diffusers_config: Mapping[str, Any], **overrides) -> DiTConfig:
    """A diffusers PixArtTransformer2DModel config dict -> DiTConfig; refuses settings our DiT does not implement."""
    cfg = {**_DIFFUSERS_DEFAULTS, **diffusers_config}
    problems = [f"{key}={cfg[key]!r} (need {value!r})" for key, value in _REQUIRED.items() if cfg[key] != value]
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    in_channels = cfg["in_channels"]
    out_channels = cfg["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        problems.append(f"out_channels={out_channels} (need in_channels or 2*in_channels)")
    if cfg["cross_attention_dim"] != hidden:
        problems.append(f"cross_attention_dim={cfg['cross_attention_dim']} (need heads*head_dim={hidden})")
    if cfg["caption_channels"] is None:
        problems.append("caption_channels=None (need a caption projection)")
    if not math.isclose(cfg["norm_eps"], 1e-6):
        problems.append(f"norm_eps={cfg['norm_eps']} (need 1e-6)")
    if cfg["use_additional_conditions"] or (cfg["use_additional_conditions"] is None and cfg["sample_size"] == 128):
        problems.append("use_additional_conditions is on (resolution/aspect conditions are not implemented)")
    fields = dict(
        image_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=in_channels,
        hidden_size=hidden,
        depth=cfg["num_layers"],
        num_heads=cfg["num_attention_heads"],
        caption_channels=cfg["caption_channels"] or 0,
        learn_sigma=out_channels != in_channels,
    )
    fields.update(overrides)
    scale = cfg["interpolation_scale"]
    if problems:
        raise ValueError("Unsupported PixArt config: " + "; ".join(problems) + ".")
    config = DiTConfig(**fields)
    if scale is not None and scale != config.pos_interpolation_scale:
        raise ValueError(
            f"Unsupported PixArt config: interpolation_scale={scale} (our DiT uses "
            f"max(sample_size // 64, 1) = {config.pos_interpolation_scale})."
        )
    return config


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """Keyword arguments for diffusers.PixArtTransformer2DModel that build the same network as `config`."""
    if config.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' PixArt MLP is 4x wide; mlp_ratio={config.mlp_ratio} cannot be exported.")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        cross_attention_dim=config.hidden_size,
        sample_size=config.image_size,
        patch_size=config.patch_size,
        caption_channels=config.caption_channels,
        use_additional_conditions=False,
        interpolation_scale=config.pos_interpolation_scale,
        norm_eps=1e-6,
        norm_elementwise_affine=False,
        norm_type="ada_norm_single",
        activation_fn="gelu-approximate",
        attention_bias=True,
    )


def _config_from_shapes(state: Mapping[str, np.ndarray], overrides: dict) -> DiTConfig:
    """For a bare .safetensors file: sizes from tensor shapes; heads and image size must come from overrides."""
    needed = [name for name in ("num_heads", "image_size") if name not in overrides]
    if needed:
        raise ValueError(
            f"A bare .safetensors file has no config.json; pass {needed} as keyword overrides "
            "(the weights do not determine them)."
        )
    hidden, in_channels, patch, _ = state["pos_embed.proj.weight"].shape
    out_channels = state["proj_out.weight"].shape[0] // (patch * patch)
    fields = dict(
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=len({key.split(".")[1] for key in state if key.startswith("transformer_blocks.")}),
        mlp_ratio=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
        caption_channels=state["caption_projection.linear_1.weight"].shape[1],
        learn_sigma=out_channels != in_channels,
    )
    return DiTConfig(**{**fields, **overrides})


def has_null_caption(directory: str) -> bool:
    """Whether the diffusers PixArt checkpoint in `directory` carries the learned null caption (reads no other tensor
    of a safetensors checkpoint)."""
    names = (WEIGHT_FILE,)
    return bool(hf_weights.read_weights(directory, keep=lambda key: key == NULL_CAPTION, names=names))


def load_pixart_checkpoint(path: str, **overrides) -> tuple[DiTConfig, dict]:
    """Load a diffusers PixArt transformer: a directory (config.json + diffusion_pytorch_model.safetensors,
    possibly sharded) or a single .safetensors file (uses a config.json beside it when there is one).
    `overrides` set DiTConfig fields the checkpoint does not fix (dtype, remat, max_text_len, ...)."""
    if os.path.isdir(path):
        fix = " Save the transformer with diffusers save_pretrained."
        directory, files = path, hf_weights.weight_files(path, (WEIGHT_FILE,), fix)
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        directory, files = os.path.dirname(path) or ".", [path]
    else:
        raise FileNotFoundError(f"{path!r} is neither a diffusers transformer directory nor a .safetensors file.")
    state = {key: np.array(value, np.float32) for key, value in hf_weights.read_files(files).items()}
    if NULL_CAPTION in state:
        overrides.setdefault("max_text_len", state[NULL_CAPTION].shape[0])
    config_file = os.path.join(directory, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = dit_config_from_diffusers(json.load(f), **overrides)
    else:
        config = _config_from_shapes(state, overrides)
    return config, diffusers_to_flax(state, config)


# --- MM-DiT (models/mmdit.py) <-> diffusers SD3Transformer2DModel -------------------------------------------------
#
# Same naming rule as above, plus: the QK RMSNorm scales are `.../norm_q/scale` in Flax and `...norm_q.weight` in
# diffusers (norm_q, norm_k, norm_added_q, norm_added_k). Examples:
#     transformer_blocks.2.attn.add_q_proj.weight [o,i]   -> transformer_blocks_2/attn/add_q_proj/kernel [i,o]
#     transformer_blocks.2.attn.norm_added_k.weight [dh]  -> transformer_blocks_2/attn/norm_added_k/scale
#     transformer_blocks.2.norm1_context.linear.weight    -> transformer_blocks_2/norm1_context/linear/kernel
#     time_text_embed.text_embedder.linear_1.bias         -> time_text_embed/text_embedder/linear_1/bias
# diffusers keeps the fixed position embedding as the buffer `pos_embed.pos_embed` (in the state dict only when built
# with pos_embed_max_size); ours is computed, so that buffer is only checked against it. `y_embedding` as for PixArt.
_SD3_POS_EMBED = "pos_embed.pos_embed"


def _mmdit_diffusers_name(path: tuple[str, ...]) -> str:
    name = flax_path_to_diffusers(path)
    return name[: -len("scale")] + "weight" if path[-1] == "scale" else name


def sd3_config(config) -> dict[str, Any]:
    """Keyword arguments for diffusers.SD3Transformer2DModel that build the same network as an MMDiTConfig.

    The text widths are caption_channels (joint_attention_dim, and pooled_projection_dim: our pooled vector is the
    masked mean of the caption embeddings); pos_embed_max_size=None makes diffusers use the uncropped sin-cos table,
    which is ours while image_size < 128 (interpolation_scale 1; diffusers' SD3 has no other scale).
    """
    problems = []
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={config.mlp_ratio} (diffusers' SD3 MLP is 4x wide)")
    if config.pos_interpolation_scale != 1:
        scale = config.pos_interpolation_scale
        problems.append(f"image_size={config.image_size} (position interpolation_scale {scale}; SD3's is 1)")
    if problems:
        raise ValueError("This MM-DiT has no diffusers SD3Transformer2DModel twin: " + "; ".join(problems) + ".")
    return dict(
        sample_size=config.image_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.caption_channels,
        caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.caption_channels,
        pos_embed_max_size=None,
        dual_attention_layers=(),
        qk_norm="rms_norm" if config.qk_norm else None,
    )


def mmdit_params_from_diffusers(state_dict: Mapping[str, Any], config, rng: jax.Array | None = None) -> dict:
    """A diffusers SD3Transformer2DModel state dict (torch tensors or numpy; SD3.0 blocks, i.e. no
    dual_attention_layers) -> float32 Flax params of `mmdit.MMDiT(config)`.

    Every parameter must be there with the config's shape (errors name the keys). A `pos_embed.pos_embed` buffer must
    equal our fixed embedding (after diffusers' centre crop). `rng` seeds the null caption when the state dict has no
    `y_embedding` (default key 0).
    """
    shapes = _param_shapes(mmdit.MMDiT(config))
    hint = (
        "Check that the checkpoint is an SD3Transformer2DModel with these sizes, qk_norm setting and no "
        "dual_attention_layers."
    )
    flat = _convert_state_dict(state_dict, config, shapes, _mmdit_diffusers_name, {_SD3_POS_EMBED}, hint)
    if _SD3_POS_EMBED in state_dict:
        table = _to_numpy(state_dict[_SD3_POS_EMBED])
        size, grid = math.isqrt(table.shape[-2]), config.grid_size
        top = (size - grid) // 2
        cropped = table.reshape(size, size, -1)[top : top + grid, top : top + grid].reshape(grid * grid, -1)
        ours = mmdit.sincos_position_embedding(config)
        if cropped.shape != ours.shape or not np.allclose(cropped, ours, atol=1e-5):
            raise ValueError(
                f"The checkpoint's position embedding ({_SD3_POS_EMBED}, {table.shape[-2]} positions cropped to "
                f"{grid}x{grid}) differs from the MM-DiT's fixed sin-cos embedding; its image tokens would be "
                "placed differently (SD3's pos_embed_max_size table spaces positions by grid/max_size)."
            )
    return _add_null_caption(flat, state_dict, shapes, rng)


def mmdit_params_to_diffusers(params: Mapping, include_null_caption: bool = False) -> dict[str, np.ndarray]:
    """MM-DiT Flax params -> diffusers SD3Transformer2DModel state dict (numpy, torch layouts)."""
    return _to_state_dict(params, _mmdit_diffusers_name, include_null_caption)
