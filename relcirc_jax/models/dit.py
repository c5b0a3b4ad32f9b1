"""PixArt-alpha Diffusion Transformer in Flax Linen, numerically equal to diffusers' PixArtTransformer2DModel.

Images are NHWC in [-1, 1]; timesteps are floats in [0, 1000); captions are [B, L, caption_channels] with a
boolean padding mask. The module tree mirrors diffusers' parameter names (`transformer_blocks.3.attn1.to_q.weight`
is params["transformer_blocks_3"]["attn1"]["to_q"]["kernel"]), see models/convert.py.

Analysis hooks: every activation listed by `hook_names(config)` can be recorded with `run_with_cache`; head
ablations are data (`self_head_mask` / `cross_head_mask` [depth, heads] multiply heads' outputs, 0 = zero-ablate;
`self_head_mean_mask` / `cross_head_mean_mask` 0 = mean-ablate within the row groups of `mean_group` [B], see
attention.py), so a screen is `jax.vmap` over masks.
Activation patching is data too: with `patch_source` [B] (the row each row reads from), `self_head_patch` /
`cross_head_patch` [depth, heads] and `resid_patch` [depth] (the residual stream entering each block) weigh how much
of the source row's activation replaces the row's own, at the timesteps in `patch_window` (t_low, t_high) inclusive.
Every parameter carries logical sharding axis names (parallel/axes.py: EMBED, HEADS, MLP, CAPTION, ADALN, TABLE,
PATCH); `DiT.init` returns boxed leaves, `init_params` returns plain arrays, `logical_specs` the PartitionSpecs.

Capture points, in forward order (N = image tokens = grid_size**2, L = caption tokens, D = hidden_size, H = heads,
Dh = D / H; activations are in the compute dtype except the float32 patterns):

    hook_caption                          [B, L, D]       the caption after caption_projection
    blocks.{i}.hook_resid_pre             [B, N, D]       the residual stream entering block i
    blocks.{i}.attn.hook_{q,k,v}          [B, N, H, Dh]   self-attention projections
    blocks.{i}.attn.hook_pattern          [B, H, N, N]    self-attention probabilities (query, key)
    blocks.{i}.attn.hook_z                [B, N, H, Dh]   per-head outputs before to_out, after masks and patches
    blocks.{i}.hook_resid_mid             [B, N, D]       after the gated self-attention residual
    blocks.{i}.cross_attn.hook_q          [B, N, H, Dh]   image-token queries
    blocks.{i}.cross_attn.hook_{k,v}      [B, L, H, Dh]   caption-token keys and values
    blocks.{i}.cross_attn.hook_pattern    [B, H, N, L]    image token -> caption token probabilities (0 on padding)
    blocks.{i}.cross_attn.hook_z          [B, N, H, Dh]   per-head outputs before to_out
    blocks.{i}.hook_resid_post            [B, N, D]       the block's output
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.diffusion.parameterization import PREDICTIONS
from relcirc_jax.models.attention import ATTENTION_HOOKS, MultiHeadAttention, logical_dense, partitioned, sow_hook
from relcirc_jax.parallel import axes

DIT_SIZES = {"b": (768, 12, 12), "mini": (384, 6, 6), "micro": (192, 6, 3), "nano": (192, 3, 3)}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
TIMESTEP_FREQUENCY_DIM = 256  # PixArt's sinusoidal timestep projection width
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchTransformerConfig:
    """The fields, checks and derived sizes shared by DiTConfig and mmdit.MMDiTConfig (see those)."""

    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    max_text_len: int = 20
    learn_sigma: bool = False
    prediction: str = (
        "eps"  # what the first out_channels mean: "eps" (PixArt), "v" or "x0" (diffusion/parameterization.py)
    )
    dtype: str = "float32"
    remat: bool = False
    # The image size whose token grid the fixed position embedding spans; None = image_size (diffusers' default). A
    # model trained at 32 px with 64 here sees the positions 0, 2, 4, 6 of a 64 px model's grid, so it can go on at
    # 64 px without relearning where things are (progressive resolution: README, Recipe levers).
    pos_embed_image_size: int | None = None

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")
        if self.prediction not in PREDICTIONS:
            problems.append(f"prediction {self.prediction!r} is not one of {PREDICTIONS}")
        if self.dtype not in COMPUTE_DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {COMPUTE_DTYPES}")
        for name in (
            "image_size",
            "patch_size",
            "in_channels",
            "hidden_size",
            "depth",
            "num_heads",
            "caption_channels",
            "max_text_len",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}: " + "; ".join(problems) + ".")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def pos_interpolation_scale(self) -> float:
        """diffusers' default `interpolation_scale` for sample_size == image_size, or with pos_embed_image_size that
        size's, stretched so this image's grid spans the same positions as that size's."""
        reference = self.pos_embed_image_size or self.image_size
        return max(reference // 64, 1) * self.image_size / reference


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(PatchTransformerConfig):
    """Static shape of a PixArt DiT. `dtype` is the compute dtype; parameters are always float32."""


def dit_config(size: str, **overrides) -> DiTConfig:
    """The paper's DiT sizes ("b", "mini", "micro", "nano") with optional field overrides."""
    if size not in DIT_SIZES:
        raise ValueError(f"Unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}.")
    hidden_size, depth, num_heads = DIT_SIZES[size]
    fields = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads)
    return DiTConfig(**{**fields, **overrides})


def hook_names(config: DiTConfig) -> list[str]:
    """All capture-point names of a model, in forward order."""
    names = ["hook_caption"]
    for layer in range(config.depth):
        block = f"blocks.{layer}"
        names.append(f"{block}.hook_resid_pre")
        names += [f"{block}.attn.{hook}" for hook in ATTENTION_HOOKS]
        names.append(f"{block}.hook_resid_mid")
        names += [f"{block}.cross_attn.{hook}" for hook in ATTENTION_HOOKS]
        names.append(f"{block}.hook_resid_post")
    return names


def timestep_frequencies(t: jnp.ndarray, dim: int = TIMESTEP_FREQUENCY_DIM) -> jnp.ndarray:
    """Sinusoidal timestep features [B, dim], cos first (diffusers Timesteps(flip_sin_to_cos=True, shift=0))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_position_embedding(dim: int, grid_size: int, interpolation_scale: float) -> np.ndarray:
    """Fixed [grid*grid, dim] embedding of a row-major token grid: first half encodes the column, second the row."""
    positions = np.arange(grid_size, dtype=np.float32) / interpolation_scale
    columns, rows = np.meshgrid(positions, positions, indexing="xy")
    return np.concatenate(
        [_sincos_1d(dim // 2, columns.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], axis=1
    ).astype(np.float32)


def layer_norm(x: jnp.ndarray) -> jnp.ndarray:
    """Parameter-free LayerNorm (eps 1e-6) computed in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    return layer_norm(x) * (1.0 + scale) + shift


def scaled_normal(axis_size_index: int):
    """N(0, 1/n) with n = shape[axis_size_index], PixArt's init for scale-shift tables and the null caption."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / math.sqrt(shape[axis_size_index])

    return init


class PatchProjection(nn.Module):
    """Stride-p, kernel-p conv as one matmul over flattened patches: [B, H, W, C] -> [B, N, D].

    Same parameters as the diffusers conv (kernel [p, p, C, D] HWIO, bias [D]) and the same values; for
    non-overlapping patches a reshape + matmul avoids XLA's CPU convolution (forward + kernel gradient a little faster).
    """

    features: int
    patch_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        p, (batch, height, width, channels) = self.patch_size, x.shape
        fan_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param(
            "kernel", partitioned(fan_init, (None, None, None, axes.EMBED)), (p, p, channels, self.features)
        )
        bias = self.param("bias", partitioned(nn.initializers.zeros_init(), (axes.EMBED,)), (self.features,))
        patches = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), p * p * channels).astype(self.dtype)
        return patches @ kernel.reshape(p * p * channels, self.features).astype(self.dtype) + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """Patchify projection + fixed 2D sin-cos position embedding -> [B, N, D]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        tokens = PatchProjection(cfg.hidden_size, cfg.patch_size, cfg.compute_dtype, name="proj")(x)
        pos = sincos_2d_position_embedding(cfg.hidden_size, cfg.grid_size, cfg.pos_interpolation_scale)
        return (tokens.astype(jnp.float32) + pos[None]).astype(cfg.compute_dtype)


class TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    hidden: int
    axes_1: tuple
    axes_2: tuple
    activation: Any
    dtype: Any

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        x = logical_dense(self.hidden, self.axes_1, self.dtype, "linear_1", kernel_init=init)(x)
        return logical_dense(self.hidden, self.axes_2, self.dtype, "linear_2", kernel_init=init)(self.activation(x))


class CombinedTimestepEmbedding(nn.Module):
    """Timestep -> [B, D] (diffusers PixArtAlphaCombinedTimestepSizeEmbeddings without size conditions)."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, t):
        return embed_timestep(t, self.hidden, self.dtype)


def embed_timestep(t: jnp.ndarray, hidden: int, dtype: Any) -> jnp.ndarray:
    """The calling module's `timestep_embedder` MLP (silu) on the sinusoidal features of t [B] -> [B, hidden]."""
    mlp = TwoLayerMLP(hidden, (None, axes.EMBED), (axes.EMBED, None), nn.silu, dtype, name="timestep_embedder")
    return mlp(timestep_frequencies(t).astype(dtype))


class AdaLayerNormSingle(nn.Module):
    """One global MLP: timestep -> (6D modulation for every block, D embedding for the final layer)."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, t):
        embedded = CombinedTimestepEmbedding(self.hidden, self.dtype, name="emb")(t)
        linear = logical_dense(
            6 * self.hidden, (axes.EMBED, axes.ADALN), self.dtype, "linear", kernel_init=nn.initializers.normal(0.02)
        )
        return linear(nn.silu(embedded)).astype(jnp.float32), embedded.astype(jnp.float32)


class GELUProjection(nn.Module):
    """diffusers `GELU(approximate="tanh")`: a projection followed by tanh-GELU."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        return nn.gelu(logical_dense(self.features, (axes.EMBED, axes.MLP), self.dtype, "proj")(x), approximate=True)


class FeedForward(nn.Module):
    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        hidden = GELUProjection(self.features, self.dtype, name="net_0")(x)
        return logical_dense(x.shape[-1], (axes.MLP, axes.EMBED), self.dtype, "net_2")(hidden)


class DiTBlock(nn.Module):
    """adaLN-single block: modulated self-attn, cross-attn to caption tokens, modulated MLP."""

    config: DiTConfig
    layer: int
    capture: tuple[str, ...] = ()

    def _record(self, hook: str, value) -> None:
        sow_hook(self, f"blocks.{self.layer}.{hook}", value)

    @nn.compact
    def __call__(
        self,
        h,
        modulation,
        caption,
        caption_mask,
        self_head_mask,
        cross_head_mask,
        self_head_mean_mask=None,
        cross_head_mean_mask=None,
        self_head_patch=None,
        cross_head_patch=None,
        patch_source=None,
        mean_group=None,
    ):
        cfg, dtype = self.config, self.config.compute_dtype
        table = self.param(
            "scale_shift_table", partitioned(scaled_normal(1), (axes.TABLE, axes.EMBED)), (6, cfg.hidden_size)
        )
        mod = table[None] + modulation.reshape(modulation.shape[0], 6, cfg.hidden_size)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        attention = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype, capture=self.capture)

        self._record("hook_resid_pre", h)  # [batch, image_pos, embed]
        attn1 = MultiHeadAttention(**attention, hook_prefix=f"blocks.{self.layer}.attn", name="attn1")
        attn_out = attn1(
            modulate(h, shift_msa, scale_msa).astype(dtype),
            head_mask=self_head_mask,
            head_mean_mask=self_head_mean_mask,
            head_patch=self_head_patch,
            patch_source=patch_source,
            mean_group=mean_group,
        )
        h = (h + gate_msa * attn_out).astype(dtype)
        self._record("hook_resid_mid", h)  # [batch, image_pos, embed], after self-attention

        attn2 = MultiHeadAttention(
            **attention, hook_prefix=f"blocks.{self.layer}.cross_attn", zero_init_out=True, name="attn2"
        )
        h = h + attn2(
            h,
            context=caption,
            key_mask=caption_mask,
            head_mask=cross_head_mask,
            head_mean_mask=cross_head_mean_mask,
            head_patch=cross_head_patch,
            patch_source=patch_source,
            mean_group=mean_group,
        )

        ff_out = FeedForward(cfg.mlp_dim, dtype, name="ff")(modulate(h, shift_mlp, scale_mlp).astype(dtype))
        h = (h + gate_mlp * ff_out).astype(dtype)
        self._record("hook_resid_post", h)  # [batch, image_pos, embed]
        return h


def check_inputs(
    config: PatchTransformerConfig, x, text, text_mask, head_masks: dict, patches: dict, mean_group=None
) -> None:
    """Shape checks of a DiT / MM-DiT call: `head_masks` maps argument names to [depth, heads] arrays or None (the
    "*_patch" ones are patch weights), `patches` holds patch_source, resid_patch and patch_window; `mean_group` [B]
    the mean ablation's row groups (attention.group_mean)."""
    cfg, model = config, type(config).__name__.removesuffix("Config")
    expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{model} input x has shape {x.shape}; expected [B, {expected[0]}, {expected[1]}, "
            f"{expected[2]}] (NHWC) for this config."
        )
    if text.ndim != 3 or text.shape[-1] != cfg.caption_channels:
        raise ValueError(
            f"text has shape {text.shape}; expected [B, L, {cfg.caption_channels}] (caption_channels of the config)."
        )
    if tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(
            f"text_mask has shape {text_mask.shape}; expected {tuple(text.shape[:2])} (one flag per caption token)."
        )
    for name, mask in head_masks.items():
        if mask is not None and tuple(mask.shape) != (cfg.depth, cfg.num_heads):
            raise ValueError(f"{name} has shape {mask.shape}; expected [depth, heads] = {(cfg.depth, cfg.num_heads)}.")
    source, resid_patch, window = patches["patch_source"], patches["resid_patch"], patches["patch_window"]
    weights = [mask for name, mask in head_masks.items() if name.endswith("_patch")] + [resid_patch]
    if source is None and any(w is not None for w in weights):
        raise ValueError("Patch weights were given without patch_source [B] (the row each row patches from).")
    if source is not None and tuple(source.shape) != (x.shape[0],):
        raise ValueError(f"patch_source has shape {source.shape}; expected [B] = ({x.shape[0]},).")
    if resid_patch is not None and tuple(resid_patch.shape) != (cfg.depth,):
        raise ValueError(f"resid_patch has shape {resid_patch.shape}; expected [depth] = ({cfg.depth},).")
    if window is not None and tuple(window.shape) != (2,):
        raise ValueError(f"patch_window has shape {window.shape}; expected [2] = (t_low, t_high).")
    if mean_group is not None and tuple(mean_group.shape) != (x.shape[0],):
        raise ValueError(f"mean_group has shape {mean_group.shape}; expected [B] = ({x.shape[0]},).")


def null_caption_param(module: nn.Module, config: PatchTransformerConfig) -> jnp.ndarray:
    """Declare the learned null caption `y_embedding` [max_text_len, Dc] of `module` (call from its compact method);
    read it with `null_caption(params, batch)`."""
    return module.param(
        "y_embedding",
        partitioned(scaled_normal(1), (None, axes.CAPTION)),
        (config.max_text_len, config.caption_channels),
    )


def gate_patches(t: jnp.ndarray, patch_window, head_masks: dict) -> jnp.ndarray:
    """The per-row patch gate [B] float32 (1 at timesteps inside `patch_window`, inclusive; all 1 without one).
    Replaces, in place, every "*_patch" entry of `head_masks` [depth, heads] by gated per-row weights [depth, B, heads].
    """
    gate = jnp.ones(t.shape, jnp.float32)
    if patch_window is not None:
        gate = ((t >= patch_window[0]) & (t <= patch_window[1])).astype(jnp.float32)
    for name, weights in head_masks.items():
        if name.endswith("_patch") and weights is not None:
            head_masks[name] = gate[None, :, None] * weights[:, None, :]  # [depth, B, heads]
    return gate


def pseudo_contextual_repulsion(repulsion, layer: int, caption, h, t, text_mask):
    """The PixArt analogue of a contextual space (notes 6.3 (A), "pseudo-contextual repulsion"; not the paper's
    method): each caption token reads the image tokens h [B, N, D] it matches (softmax over positions of
    caption . h / sqrt(D)), the sum f = caption + readout is repelled, and its change is added to the per-sample
    caption [B, L, D] the later blocks' cross-attention reads. A no-op unless the repulsion's target is
    "pseudo_text"; exactly the caption when it is off."""
    if repulsion.config.target != "pseudo_text":
        return caption
    scores = jnp.einsum("bld,bnd->bln", caption.astype(jnp.float32), h.astype(jnp.float32)) / math.sqrt(h.shape[-1])
    readout = jnp.einsum("bln,bnd->bld", jax.nn.softmax(scores, axis=-1), h.astype(jnp.float32))
    contextual = caption.astype(jnp.float32) + readout
    moved = repulsion.apply(contextual, layer, "block_out", "pseudo_text", t, text_mask)
    return (caption + (moved - contextual)).astype(caption.dtype)


def patch_residual(h: jnp.ndarray, weight: jnp.ndarray, patch_source) -> jnp.ndarray:
    """Residual-stream patching: h [B, N, D] <- h + w * (h[patch_source] - h) with per-row weights w [B]."""
    return h + weight.astype(h.dtype)[:, None, None] * (h[patch_source] - h)


def output_projection(h: jnp.ndarray, config: PatchTransformerConfig) -> jnp.ndarray:
    """The zero-initialised `proj_out` of the calling module's compact method, then unpatchify: [B, H, W, C_out]."""
    patch_features = config.patch_size * config.patch_size * config.out_channels
    proj_out = logical_dense(
        patch_features,
        (axes.EMBED, axes.PATCH),
        config.compute_dtype,
        "proj_out",
        kernel_init=nn.initializers.zeros_init(),
    )
    return unpatchify(proj_out(h).astype(jnp.float32), config)


class DiT(nn.Module):
    """PixArt-alpha DiT: (x [B,H,W,C], t [B], text [B,L,Dc], text_mask [B,L]) -> [B,H,W,C_out] float32.

    `null_caption_rows` [B] bool (training's caption dropout) replaces those examples' captions by the learned null
    caption. The swap happens after the caption projection, which acts per token, so it equals projecting the
    swapped captions while the null caption's gradient costs one [L, Dc] projection instead of a [B, L, Dc] one.
    Head masks and patches: see the module docstring and attention.py.
    """

    config: DiTConfig
    capture: tuple[str, ...] = ()

    @nn.compact
    def __call__(
        self,
        x,
        t,
        text,
        text_mask,
        *,
        self_head_mask=None,
        cross_head_mask=None,
        self_head_mean_mask=None,
        cross_head_mean_mask=None,
        self_head_patch=None,
        cross_head_patch=None,
        resid_patch=None,
        patch_source=None,
        patch_window=None,
        mean_group=None,
        null_caption_rows=None,
        repulsion=None,
    ):
        cfg, dtype = self.config, self.config.compute_dtype
        if repulsion is not None and (
            repulsion.config.target not in ("image", "pseudo_text") or repulsion.config.site != "block_out"
        ):
            raise ValueError(
                "The PixArt DiT repels its image tokens or its pseudo-contextual caption at site 'block_out': its "
                "text tokens are the same static caption in every sample, so a text repulsion has zero gradient. "
                "Fix: RepulsionConfig(target='image' or 'pseudo_text', site='block_out'), or an MM-DiT "
                "(model.arch='mmdit')."
            )
        head_masks = {
            "self_head_mask": self_head_mask,
            "cross_head_mask": cross_head_mask,
            "self_head_mean_mask": self_head_mean_mask,
            "cross_head_mean_mask": cross_head_mean_mask,
            "self_head_patch": self_head_patch,
            "cross_head_patch": cross_head_patch,
        }
        patches = {"patch_source": patch_source, "resid_patch": resid_patch, "patch_window": patch_window}
        check_inputs(cfg, x, text, text_mask, head_masks, patches, mean_group)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        null_text = null_caption_param(self, cfg)  # for classifier-free guidance

        h = PatchEmbed(cfg, name="pos_embed")(x)
        # adaLN-single: one timestep MLP gives every block its [B, 6D] modulation (shift, scale, gate x 2)
        modulation, t_embedding = AdaLayerNormSingle(cfg.hidden_size, dtype, name="adaln_single")(t)
        gelu_tanh = lambda y: nn.gelu(y, approximate=True)  # noqa: E731
        caption_projection = TwoLayerMLP(
            cfg.hidden_size, (axes.CAPTION, axes.EMBED), (axes.EMBED, None), gelu_tanh, dtype, name="caption_projection"
        )
        caption = caption_projection(text.astype(dtype))
        text_mask = text_mask.astype(bool)
        if null_caption_rows is not None:
            caption = jnp.where(null_caption_rows[:, None, None], caption_projection(null_text.astype(dtype)), caption)
            text_mask = text_mask | null_caption_rows[:, None]  # the null caption has no padding
        sow_hook(self, "hook_caption", caption)  # [batch, text_pos, embed], the projected caption

        gate = gate_patches(t, patch_window, head_masks)  # patch weights per row: zero outside the timestep window

        block_cls = nn.remat(DiTBlock) if cfg.remat else DiTBlock
        for layer in range(cfg.depth):
            if resid_patch is not None:
                h = patch_residual(h, resid_patch[layer] * gate, patch_source)
            block = block_cls(cfg, layer, self.capture, name=f"transformer_blocks_{layer}")
            layer_masks = (None if m is None else m[layer] for m in head_masks.values())
            h = block(h, modulation, caption, text_mask, *layer_masks, patch_source, mean_group)
            if repulsion is not None:  # analysis/repulsion.py
                h = repulsion.apply(h, layer, "block_out", "image", t)
                caption = pseudo_contextual_repulsion(repulsion, layer, caption, h, t, text_mask)

        table = self.param(
            "scale_shift_table", partitioned(scaled_normal(1), (axes.TABLE, axes.EMBED)), (2, cfg.hidden_size)
        )
        shift, scale = jnp.split(table[None] + t_embedding[:, None], 2, axis=1)
        return output_projection(modulate(h, shift, scale).astype(dtype), cfg)


def unpatchify(tokens: jnp.ndarray, config: DiTConfig) -> jnp.ndarray:
    """[B, N, p*p*C] (p, q, c order per token) -> [B, H, W, C]."""
    g, p, c = config.grid_size, config.patch_size, config.out_channels
    x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
    return jnp.einsum("bhwpqc->bhpwqc", x).reshape(tokens.shape[0], g * p, g * p, c)


def example_inputs(config: DiTConfig, batch: int = 1):
    return (
        jnp.zeros((batch, config.image_size, config.image_size, config.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, config.max_text_len, config.caption_channels), jnp.float32),
        jnp.ones((batch, config.max_text_len), bool),
    )


def abstract_variables(model: nn.Module) -> Any:
    """`model.init`'s variables on `example_inputs(model.config)` as boxed shapes (no compute)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model.config)))


def init_model_params(model: nn.Module, rng: jax.Array) -> dict:
    """Fresh float32 parameters of a DiT / MM-DiT module as plain arrays (the inner "params" tree, unboxed)."""
    variables = jax.jit(model.init)(rng, *example_inputs(model.config))
    return nn.unbox(variables["params"])


def init_params(config: DiTConfig, rng: jax.Array) -> dict:
    """Fresh float32 parameters as plain arrays (the inner "params" tree, without sharding boxes)."""
    return init_model_params(DiT(config), rng)


def logical_specs(config: DiTConfig) -> Any:
    """PartitionSpecs of logical axis names, same tree as `init_params` (no compute, shapes only)."""
    return nn.get_partition_spec(abstract_variables(DiT(config))["params"])


def _params_tree(params: Mapping) -> Mapping:
    """Accept either the inner params tree or a {"params": ...} variables dict."""
    return params["params"] if set(params) == {"params"} else params


def null_caption(params: Mapping, batch: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The learned null caption for classifier-free guidance: ([B, L, Dc] float32, all-True mask [B, L])."""
    y = nn.unbox(_params_tree(params)["y_embedding"])
    return jnp.broadcast_to(y[None], (batch,) + y.shape), jnp.ones((batch, y.shape[0]), bool)


def run_with_cache(model: DiT, params: Mapping, x, t, text, text_mask, names: Sequence[str], **kwargs):
    """Forward pass recording the named capture points: (output, {name: array}).

    `kwargs` go to DiT.__call__ (e.g. head masks). Unknown names raise ValueError listing the valid ones.
    """
    return capture_forward(model, hook_names(model.config), params, x, t, text, text_mask, names, **kwargs)


def capture_forward(
    model: nn.Module, valid: Sequence[str], params: Mapping, x, t, text, text_mask, names: Sequence[str], **kwargs
):
    """`run_with_cache` of any model class with a `capture` field, given its valid hook names. Compiled (once per
    model, names and input shapes): run op by op, a small DiT's forward takes seconds."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"Unknown hook names {unknown}; valid names are: {valid}")
    capturing = type(model)(model.config, capture=tuple(names))
    out, values = _capture_apply(capturing, _params_tree(params), x, t, text, text_mask, kwargs)
    return out, dict(zip(names, values))  # in the caller's order (jit returns a dict's keys sorted)


@functools.partial(jax.jit, static_argnums=0)
def _capture_apply(capturing: nn.Module, params: Mapping, x, t, text, text_mask, kwargs: dict):
    out, state = capturing.apply({"params": params}, x, t, text, text_mask, mutable=["intermediates"], **kwargs)
    cache = collect_sown(state.get("intermediates", {}))
    return out, [cache[name] for name in capturing.capture]


def collect_sown(tree: Mapping, cache: dict | None = None) -> dict:
    """The nested "intermediates" collection flattened to {full hook name: value}."""
    cache = {} if cache is None else cache
    for key, value in tree.items():
        if isinstance(value, tuple):
            cache[key] = value[0]
        else:
            collect_sown(value, cache)
    return cache
