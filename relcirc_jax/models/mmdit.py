"""SD3-style dual-stream MM-DiT in Flax Linen, block for block equal to diffusers' SD3Transformer2DModel.

Why it exists: in the PixArt DiT (dit.py) the caption is projected once and every block's cross-attention reads the
same caption tokens, so text tokens never see the image. In an MM-DiT the text tokens form a second residual stream
that is updated in every block by a joint attention over [text; image], so they become image-informed and per-sample
(the "contextual space" of /work/shared/papers/contextual_repulsion_notes.md, section 6.2).

Architecture (decided to follow diffusers' `SD3Transformer2DModel` with `dual_attention_layers=()` (SD3.0 blocks, no
SD3.5 second image attention) and `qk_norm="rms_norm"` (SD3.5), so weights compare 1:1, see models/convert.py):

* Image stream: the same patch projection and fixed 2-D sin-cos position embedding as dit.py (PixArt's
  `interpolation_scale = max(image_size // 64, 1)`; SD3 crops a 96x96 table instead, identical to ours when diffusers
  is built with `pos_embed_max_size=None` and image_size < 128). Text stream: one linear `context_embedder`
  (Dc -> D) per token, as SD3 (PixArt uses a two-layer MLP); no text position embedding (RTE brings its own).
* Conditioning: SD3's, not PixArt's adaLN-single. `time_text_embed` = timestep MLP (same sinusoid + MLP as PixArt)
  + a pooled-text MLP (linear, SiLU, linear). SD3 pools with CLIP; our encoders give per-token embeddings, so the
  pooled vector is the **masked mean of the raw caption embeddings** over valid tokens ([B, Dc]; all zeros for a row
  with no valid token). Every block turns this [B, D] conditioning into its own modulations (adaLN-Zero):
  `norm1.linear` (image) and `norm1_context.linear` (text) give 6D each, chunked in diffusers' order
  (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp). So there are no PixArt scale-shift tables.
* Block (diffusers `JointTransformerBlock`): parameter-free LayerNorm (eps 1e-6) + modulation per stream; joint
  attention with separate projections per stream (image: to_q/to_k/to_v/to_out_0, text:
  add_q_proj/add_k_proj/add_v_proj/to_add_out), per-head RMSNorm on q and k (eps 1e-6, learned [head_dim] scale; image
  norm_q/norm_k, text norm_added_q/norm_added_k), one softmax over all keys with scale head_dim**-0.5; gated residual;
  modulated LayerNorm + tanh-GELU FeedForward (4D) per stream (ff, ff_context); gated residual.
* The last block is `context_pre_only` (SD3): its text stream only supplies keys/values (its text queries are still
  computed, as diffusers does, so `add_q_proj` exists there), `norm1_context` is an AdaLayerNormContinuous (linear to
  2D chunked **(scale, shift)**, scale first), and it has no `to_add_out`, `ff_context` or text output.
* Output: `norm_out` AdaLayerNormContinuous (2D, (scale, shift)) on the conditioning, linear `proj_out`, unpatchify.

Departures from SD3/diffusers, and why:

* Token order in the joint sequence is **text first, then image** ([Lt text; N image], as the SD3 reference code and
  Flux; diffusers' JointAttnProcessor2_0 concatenates [image; text]). Attention is permutation-equivariant, so the
  outputs are identical; it only fixes the layout of the `attn.hook_*` captures: joint position j < Lt is text token
  j, position Lt + i is image token i.
* Padded text tokens are masked as keys (diffusers' joint attention takes no mask; SD3 attends to T5's padding):
  key j < Lt is dropped where `text_mask` is False (its probability is exactly 0). Padded positions still run as
  queries, so their own stream holds finite values, but nothing else reads them: the image output does not depend on
  what padded tokens contain. With the mask, a padded caption gives exactly what diffusers gives on the caption cut
  to its valid tokens (tests/test_mmdit_vs_diffusers.py).
* A learned null caption `y_embedding` [max_text_len, Dc] (PixArt's, not SD3's) for caption dropout and CFG, used as
  in dit.py via `null_caption_rows`; its pooled vector is its plain mean.
* Initialisation follows DiT's adaLN-Zero, not diffusers' torch defaults: xavier-uniform linears, N(0, 0.02) for the
  timestep, pooled-text and context embedders, and zeros for every adaLN linear (so each block starts as the identity)
  and for `proj_out`.

Analysis hooks (`hook_names(config)`, `run_with_cache`): `hook_caption` (the projected text stream entering block 0),
and per block `blocks.l.hook_resid_pre` / `hook_context_pre` (image / text stream entering), `blocks.l.attn.hook_q`,
`hook_k`, `hook_v` [B, Lt+N, heads, head_dim] (q and k after the QK RMSNorm, i.e. what the logits read),
`hook_pattern` [B, heads, Lt+N, Lt+N], `hook_z` [B, Lt+N, heads, head_dim] (after the masks and patches below),
`blocks.l.hook_attn_out` / `hook_context_attn_out` (each stream's attention output after its out-projection, before
the gate: the notes' `site=attn_out`), `blocks.l.hook_resid_post` / `hook_context_post` (streams leaving the block,
`site=block_out`). The last block has no `hook_context_attn_out` or `hook_context_post`.

Interventions as data, as in dit.py but on the joint attention (one head = one head of the joint sequence, acting on
text and image queries alike): `self_head_mask` [depth, heads] multiplies z (0 = zero-ablate), `self_head_mean_mask`
[depth, heads] mean-ablates (z <- m z + (1 - m) mean z, the mean taken **per stream** over the batch and that stream's
query positions, valid text tokens only), `self_head_patch` [depth, heads] and `resid_patch` [depth] (both streams
entering the block) patch from row `patch_source[b]` within `patch_window`. Every parameter carries logical sharding
axes (parallel/axes.py: EMBED, HEADS, MLP, CAPTION, ADALN, PATCH; the [head_dim] RMSNorm scales are replicated).

Parameter-matched sizes (`matched_size`, `mmdit_config`): an MM-DiT block has ~36 D^2 parameters (two 6D adaLN
linears, two sets of q/k/v/out, two MLPs) against PixArt's ~16 D^2. The PixArt size's depth and heads are kept (one
[depth, heads] grid for head screens) and the head width, a multiple of 4, is fitted: 44 or 48 instead of 64.
Total parameters (both models with their null caption; 64 px, patch 8, RGB, max_text_len 20; `parameter_count`):

    caption_channels  size   PixArt (D, depth, heads)  params        MM-DiT (D, depth, heads)  params        ratio
    4096 (RTE, T5)    nano   (192, 3, 3)                  3,069,248  (132, 3, 3)                  2,985,056  0.973
    4096              micro  (192, 6, 3)                  4,849,664  (132, 6, 3)                  4,879,256  1.006
    4096              mini   (384, 6, 6)                 17,284,928  (264, 6, 6)                 16,888,880  0.977
    4096              b      (768, 12, 12)              121,869,248  (528, 12, 12)              122,862,176  1.008
    384 (MiniLM)      nano   (192, 3, 3)                  2,282,304  (144, 3, 3)                  2,276,736  0.998
    384               micro  (192, 6, 3)                  4,062,720  (132, 6, 3)                  3,825,048  0.941
    384               mini   (384, 6, 6)                 15,785,280  (264, 6, 6)                 14,854,704  0.941
    384               b      (768, 12, 12)              118,944,192  (528, 12, 12)              118,868,064  0.999
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

from relcirc_jax.models import dit
from relcirc_jax.models.attention import ATTENTION_HOOKS, group_mean, logical_dense, partitioned, sow_hook
from relcirc_jax.parallel import axes

NORM_EPS = 1e-6  # every LayerNorm and the QK RMSNorms (diffusers' SD3 blocks)
BLOCK_HOOKS_PRE = ("hook_resid_pre", "hook_context_pre")
BLOCK_HOOKS_POST = ("hook_attn_out", "hook_context_attn_out", "hook_resid_post", "hook_context_post")
TEXT_OUTPUT_HOOKS = ("hook_context_attn_out", "hook_context_post")  # absent in the context_pre_only last block


@dataclasses.dataclass(frozen=True, kw_only=True)
class MMDiTConfig(dit.PatchTransformerConfig):
    """Static shape of an MM-DiT. `dtype` is the compute dtype; parameters are always float32.

    The fields, checks and derived sizes are DiTConfig's (dit.PatchTransformerConfig); `qk_norm` switches the
    per-head RMSNorm of q and k (SD3.5; False gives SD3.0's blocks).
    """

    qk_norm: bool = True

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size


def hook_names(config: MMDiTConfig) -> list[str]:
    """All capture-point names of a model, in forward order (see the module docstring)."""
    names = ["hook_caption"]
    for layer in range(config.depth):
        block = f"blocks.{layer}"
        last = layer == config.depth - 1
        names += [f"{block}.{hook}" for hook in BLOCK_HOOKS_PRE]
        names += [f"{block}.attn.{hook}" for hook in ATTENTION_HOOKS]
        names += [f"{block}.{hook}" for hook in BLOCK_HOOKS_POST if not (last and hook in TEXT_OUTPUT_HOOKS)]
    return names


def masked_mean(text: jnp.ndarray, text_mask: jnp.ndarray) -> jnp.ndarray:
    """The pooled caption: float32 mean of text [B, L, Dc] over the tokens where text_mask [B, L] is True (0 if
    none)."""
    weights = text_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(text.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """x / rms(x) * scale over the last axis, in float32 (scale broadcasts against x)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS) * scale


class RMSNorm(nn.Module):
    """diffusers RMSNorm(head_dim, eps=1e-6) over the last axis, in float32, with a learned scale (init ones)."""

    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), (None,)), (x.shape[-1],))
        return rms_norm(x, scale).astype(self.dtype)


class AdaLNModulation(nn.Module):
    """The conditioning half of diffusers' AdaLayerNormZero (chunks=6) / AdaLayerNormContinuous (chunks=2):
    linear(silu(temb)) split into `chunks` float32 [B, 1, D] arrays, in diffusers' order. Zero-initialised."""

    hidden: int
    chunks: int
    dtype: Any

    @nn.compact
    def __call__(self, temb):
        linear = logical_dense(
            self.chunks * self.hidden,
            (axes.EMBED, axes.ADALN),
            self.dtype,
            "linear",
            kernel_init=nn.initializers.zeros_init(),
        )
        out = linear(nn.silu(temb)).astype(jnp.float32)[:, None, :]
        return jnp.split(out, self.chunks, axis=-1)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """diffusers CombinedTimestepTextProjEmbeddings: timestep MLP(sinusoid(t)) + pooled-text MLP(pooled) -> [B, D]."""

    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, t, pooled):
        timestep = dit.embed_timestep(t, self.hidden, self.dtype)
        text_embedder = dit.TwoLayerMLP(
            self.hidden, (axes.CAPTION, axes.EMBED), (axes.EMBED, None), nn.silu, self.dtype, name="text_embedder"
        )
        return timestep + text_embedder(pooled)


class JointAttention(nn.Module):
    """SD3 joint attention over [text; image] with separate projections per stream (diffusers JointAttnProcessor2_0).

    Returns (image output [B, N, D], text output [B, Lt, D] or None when `context_pre_only`). `key_mask` [B, Lt]
    (True = attend) drops padded text keys; image keys are always attended. Head interventions: see the module
    docstring (mask, then mean-ablation, then patch, as attention.MultiHeadAttention).
    """

    num_heads: int
    head_dim: int
    qk_norm: bool
    context_pre_only: bool
    dtype: Any
    hook_prefix: str
    capture: tuple[str, ...] = ()

    def _record(self, hook: str, value) -> None:
        sow_hook(self, f"{self.hook_prefix}.{hook}", value)

    @nn.compact
    def __call__(
        self,
        x,
        context,
        key_mask,
        head_mask=None,
        head_mean_mask=None,
        head_patch=None,
        patch_source=None,
        mean_group=None,
    ):
        inner, dtype = self.num_heads * self.head_dim, self.dtype
        split = lambda y: y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))
        project = lambda name, y: split(logical_dense(inner, (axes.EMBED, axes.HEADS), dtype, name)(y))
        q_img, k_img, v_img = (project(name, x) for name in ("to_q", "to_k", "to_v"))
        q_txt, k_txt, v_txt = (project(name, context) for name in ("add_q_proj", "add_k_proj", "add_v_proj"))
        if self.qk_norm:
            q_img, k_img = RMSNorm(dtype, name="norm_q")(q_img), RMSNorm(dtype, name="norm_k")(k_img)
            q_txt, k_txt = RMSNorm(dtype, name="norm_added_q")(q_txt), RMSNorm(dtype, name="norm_added_k")(k_txt)
        text_len = context.shape[1]
        q = jnp.concatenate([q_txt, q_img], axis=1)  # joint order: text first, then image
        k = jnp.concatenate([k_txt, k_img], axis=1)
        v = jnp.concatenate([v_txt, v_img], axis=1)
        self._record("hook_q", q)  # [batch, text_pos + image_pos, heads, head_dim], after the QK RMSNorm
        self._record("hook_k", k)  # [batch, text_pos + image_pos, heads, head_dim], after the QK RMSNorm
        self._record("hook_v", v)  # [batch, text_pos + image_pos, heads, head_dim]

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        joint_mask = jnp.concatenate([key_mask.astype(bool), jnp.ones((x.shape[0], x.shape[1]), bool)], axis=1)
        logits = jnp.where(joint_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        pattern = nn.softmax(logits, axis=-1)
        self._record("hook_pattern", pattern)  # [batch, heads, joint query_pos, joint key_pos], float32

        z = jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(dtype), v)
        if head_mask is not None:
            z = z * head_mask.astype(z.dtype)[None, None, :, None]
        if head_mean_mask is not None:  # per joint position, text positions over the rows where the token is valid
            keep = head_mean_mask.astype(jnp.float32)[None, None, :, None]
            mean = group_mean(z, mean_group, valid=joint_mask)
            z = (keep * z.astype(jnp.float32) + (1 - keep) * mean).astype(z.dtype)
        if head_patch is not None:
            z = z + head_patch.astype(z.dtype)[:, None, :, None] * (z[patch_source] - z)
        self._record("hook_z", z)  # [batch, joint query_pos, heads, head_dim], after masks and patches

        z = z.reshape(z.shape[:2] + (inner,))
        image_out = logical_dense(x.shape[-1], (axes.HEADS, axes.EMBED), dtype, "to_out_0")(z[:, text_len:])
        if self.context_pre_only:
            return image_out, None
        text_out = logical_dense(context.shape[-1], (axes.HEADS, axes.EMBED), dtype, "to_add_out")(z[:, :text_len])
        return image_out, text_out


class JointTransformerBlock(nn.Module):
    """diffusers JointTransformerBlock (use_dual_attention=False): (image [B,N,D], text [B,Lt,D], temb [B,D]) ->
    (image, text or None when `context_pre_only`)."""

    config: MMDiTConfig
    layer: int
    context_pre_only: bool = False
    capture: tuple[str, ...] = ()

    def _record(self, hook: str, value) -> None:
        sow_hook(self, f"blocks.{self.layer}.{hook}", value)

    @nn.compact
    def __call__(
        self,
        h,
        c,
        temb,
        text_mask,
        head_mask=None,
        head_mean_mask=None,
        head_patch=None,
        patch_source=None,
        mean_group=None,
        repel=lambda value, stream: value,
    ):
        cfg, dtype = self.config, self.config.compute_dtype
        self._record("hook_resid_pre", h)  # [batch, image_pos, embed]
        self._record("hook_context_pre", c)  # [batch, text_pos, embed]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
            cfg.hidden_size, 6, dtype, name="norm1"
        )(temb)
        if self.context_pre_only:
            c_scale, c_shift = AdaLNModulation(cfg.hidden_size, 2, dtype, name="norm1_context")(temb)
            norm_c = dit.modulate(c, c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLNModulation(
                cfg.hidden_size, 6, dtype, name="norm1_context"
            )(temb)
            norm_c = dit.modulate(c, c_shift_msa, c_scale_msa)

        attn = JointAttention(
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            qk_norm=cfg.qk_norm,
            context_pre_only=self.context_pre_only,
            dtype=dtype,
            hook_prefix=f"blocks.{self.layer}.attn",
            capture=self.capture,
            name="attn",
        )
        attn_out, context_attn_out = attn(
            dit.modulate(h, shift_msa, scale_msa).astype(dtype),
            norm_c.astype(dtype),
            text_mask,
            head_mask=head_mask,
            head_mean_mask=head_mean_mask,
            head_patch=head_patch,
            patch_source=patch_source,
            mean_group=mean_group,
        )
        self._record("hook_attn_out", attn_out)  # [batch, image_pos, embed], before the gate
        attn_out = repel(attn_out, "image")
        h = (h + gate_msa * attn_out).astype(dtype)
        ff_out = dit.FeedForward(cfg.mlp_dim, dtype, name="ff")(dit.modulate(h, shift_mlp, scale_mlp).astype(dtype))
        h = (h + gate_mlp * ff_out).astype(dtype)
        self._record("hook_resid_post", h)  # [batch, image_pos, embed]
        if self.context_pre_only:
            return h, None

        self._record("hook_context_attn_out", context_attn_out)  # [batch, text_pos, embed], before the gate
        context_attn_out = repel(context_attn_out, "text")
        c = (c + c_gate_msa * context_attn_out).astype(dtype)
        ff_context = dit.FeedForward(cfg.mlp_dim, dtype, name="ff_context")
        c = (c + c_gate_mlp * ff_context(dit.modulate(c, c_shift_mlp, c_scale_mlp).astype(dtype))).astype(dtype)
        self._record("hook_context_post", c)  # [batch, text_pos, embed]
        return h, c


class MMDiT(nn.Module):
    """MM-DiT: (x [B,H,W,C], t [B], text [B,L,Dc], text_mask [B,L]) -> [B,H,W,C_out] float32.

    `null_caption_rows` [B] bool (caption dropout) replaces those rows' captions by the learned null caption (after
    the per-token context projection, as in dit.DiT; the pooled vector becomes the null caption's mean).
    Head masks and patches: see the module docstring.
    """

    config: MMDiTConfig
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
        self_head_mean_mask=None,
        self_head_patch=None,
        resid_patch=None,
        patch_source=None,
        patch_window=None,
        mean_group=None,
        null_caption_rows=None,
        repulsion=None,
    ):
        cfg, dtype = self.config, self.config.compute_dtype
        head_masks = {
            "self_head_mask": self_head_mask,
            "self_head_mean_mask": self_head_mean_mask,
            "self_head_patch": self_head_patch,
        }
        patches = {"patch_source": patch_source, "resid_patch": resid_patch, "patch_window": patch_window}
        dit.check_inputs(cfg, x, text, text_mask, head_masks, patches, mean_group)
        if repulsion is not None and repulsion.config.target == "pseudo_text":
            raise ValueError(
                "target='pseudo_text' is the PixArt DiT's stand-in for a contextual space; an MM-DiT has the real one. "
                "Fix: RepulsionConfig(target='text')."
            )
        x, text, batch = jnp.asarray(x), jnp.asarray(text), x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        null_text = dit.null_caption_param(self, cfg)

        h = dit.PatchEmbed(cfg, name="pos_embed")(x)
        text_mask = text_mask.astype(bool)
        pooled = masked_mean(text, text_mask)
        context_embedder = logical_dense(
            cfg.hidden_size, (axes.CAPTION, axes.EMBED), dtype, "context_embedder", nn.initializers.normal(0.02)
        )
        c = context_embedder(text.astype(dtype))
        if null_caption_rows is not None:
            pooled = jnp.where(null_caption_rows[:, None], jnp.mean(null_text, axis=0)[None], pooled)
            c = jnp.where(null_caption_rows[:, None, None], context_embedder(null_text.astype(dtype)), c)
            text_mask = text_mask | null_caption_rows[:, None]  # the null caption has no padding
        sow_hook(self, "hook_caption", c)
        temb = CombinedTimestepTextProjEmbeddings(cfg.hidden_size, dtype, name="time_text_embed")(
            t, pooled.astype(dtype)
        )

        gate = dit.gate_patches(t, patch_window, head_masks)

        block_cls = nn.remat(JointTransformerBlock) if cfg.remat else JointTransformerBlock
        for layer in range(cfg.depth):
            if resid_patch is not None:
                h = dit.patch_residual(h, resid_patch[layer] * gate, patch_source)
                c = dit.patch_residual(c, resid_patch[layer] * gate, patch_source)
            last = layer == cfg.depth - 1
            block = block_cls(cfg, layer, last, self.capture, name=f"transformer_blocks_{layer}")
            layer_masks = (None if m is None else m[layer] for m in head_masks.values())
            if repulsion is None:
                h, c = block(h, c, temb, text_mask, *layer_masks, patch_source, mean_group)
                continue
            # analysis/repulsion.py: each site and stream is a no-op unless the repulsion's config names it
            repel = functools.partial(_repel_at, repulsion, layer, "attn_out", t=t, text_mask=text_mask)
            h, c = block(h, c, temb, text_mask, *layer_masks, patch_source, mean_group, repel=repel)
            h = _repel_at(repulsion, layer, "block_out", h, "image", t=t, text_mask=text_mask)
            if c is not None:
                c = _repel_at(repulsion, layer, "block_out", c, "text", t=t, text_mask=text_mask)

        scale, shift = AdaLNModulation(cfg.hidden_size, 2, dtype, name="norm_out")(temb)
        return dit.output_projection(dit.modulate(h, shift, scale).astype(dtype), cfg)


def _repel_at(repulsion, layer: int, site: str, value, stream: str, *, t, text_mask):
    return repulsion.apply(value, layer, site, stream, t, text_mask)


example_inputs = dit.example_inputs


@functools.cache  # configs are frozen dataclasses; each MM-DiT config built (matched_size) would trace a DiT again
def parameter_count(config) -> int:
    """Number of parameters of an MMDiTConfig's or a DiTConfig's model, from the module's shapes (no compute)."""
    model = MMDiT(config) if isinstance(config, MMDiTConfig) else dit.DiT(config)
    shapes = dit.abstract_variables(model)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(shapes["params"])))


def mmdit_parameter_count(config: MMDiTConfig) -> int:
    """`parameter_count(config)` in closed form (instant; tests check that the two agree)."""
    d, m, dc = config.hidden_size, config.mlp_dim, config.caption_channels
    patch_in = config.patch_size**2 * config.in_channels
    patch_out = config.patch_size**2 * config.out_channels
    linear = lambda n_in, n_out: n_in * n_out + n_out
    ff = linear(d, m) + linear(m, d)
    qk_norms = 4 * config.head_dim if config.qk_norm else 0
    embeddings = (
        config.max_text_len * dc  # y_embedding
        + linear(patch_in, d)  # pos_embed.proj
        + linear(dit.TIMESTEP_FREQUENCY_DIM, d)
        + linear(d, d)  # time_text_embed.timestep_embedder
        + linear(dc, d)
        + linear(d, d)  # time_text_embed.text_embedder
        + linear(dc, d)  # context_embedder
    )
    block = 2 * linear(d, 6 * d) + 8 * linear(d, d) + qk_norms + 2 * ff
    last_block = linear(d, 6 * d) + linear(d, 2 * d) + 7 * linear(d, d) + qk_norms + ff
    head = linear(d, 2 * d) + linear(d, patch_out)  # norm_out, proj_out
    return embeddings + (config.depth - 1) * block + last_block + head


def matched_size(pixart_size: str, **fields) -> tuple[int, int, int]:
    """(hidden_size, depth, num_heads) of the MM-DiT parameter-matched to PixArt size `pixart_size`.

    The PixArt size's depth and number of heads are kept, so head screens share one [depth, heads] grid; the head
    width (a multiple of 4) is chosen to bring the parameter count closest to the PixArt model's (an MM-DiT block has
    ~2.25x the parameters of a PixArt block of the same width, so the width comes out ~2/3 of PixArt's: head width 44
    or 48 instead of 64). `fields` are the other config fields both models share (caption_channels, max_text_len,
    image_size, patch_size, ...; `qk_norm` only for the MM-DiT); they matter because the caption projections scale
    with caption_channels. Counts for the defaults are in the module docstring; within 6 % for caption_channels 384,
    768 and 4096.
    """
    if pixart_size not in dit.DIT_SIZES:
        raise ValueError(f"Unknown DiT size {pixart_size!r}; choose one of {sorted(dit.DIT_SIZES)}.")
    hidden, depth, heads = dit.DIT_SIZES[pixart_size]
    shared = {k: v for k, v in fields.items() if k != "qk_norm"}
    target = parameter_count(dit.DiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, **shared))
    count = lambda head_dim: mmdit_parameter_count(
        MMDiTConfig(hidden_size=heads * head_dim, depth=depth, num_heads=heads, **fields)
    )
    best = min(range(4, 2 * hidden // heads + 1, 4), key=lambda head_dim: abs(math.log(count(head_dim) / target)))
    return heads * best, depth, heads


def mmdit_config(size: str, **overrides) -> MMDiTConfig:
    """The MM-DiT parameter-matched (`matched_size`) to PixArt size `size` ("b", "mini", "micro", "nano") for the
    overrides' caption_channels etc., with the overrides applied; explicit hidden_size/depth/num_heads win."""
    sizes = ("hidden_size", "depth", "num_heads")
    shared = {k: v for k, v in overrides.items() if k not in sizes}
    hidden_size, depth, num_heads = matched_size(size, **shared)
    return MMDiTConfig(**{**dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads), **overrides})


null_caption = dit.null_caption
collect_sown = dit.collect_sown


def run_with_cache(model: MMDiT, params: Mapping, x, t, text, text_mask, names: Sequence[str], **kwargs):
    """Forward pass recording the named capture points: (output, {name: array}).

    `kwargs` go to MMDiT.__call__ (e.g. head masks). Unknown names raise ValueError listing the valid ones.
    """
    return dit.capture_forward(model, hook_names(model.config), params, x, t, text, text_mask, names, **kwargs)


def sincos_position_embedding(config: MMDiTConfig) -> np.ndarray:
    """The fixed [N, D] image position embedding (dit.py's)."""
    return dit.sincos_2d_position_embedding(config.hidden_size, config.grid_size, config.pos_interpolation_scale)
