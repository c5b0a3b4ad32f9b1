"""Multi-head attention with TransformerLens-style capture points and per-head output masks.

Parameter names follow diffusers' `Attention` (to_q, to_k, to_v, to_out_0) so checkpoints convert 1:1.
Capture points (`hook_q`, `hook_k`, `hook_v`, `hook_pattern`, `hook_z`) are sown into the "intermediates"
collection under their full hook name, and only when that name is in `capture` (decided at trace time).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from relcirc_jax.models.dense import Dense
from relcirc_jax.parallel import axes

ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z")


def sow_hook(module: nn.Module, name: str, value) -> None:
    """Sow `value` into the "intermediates" collection under `name`, only when `module.capture` lists it."""
    if name in module.capture:
        module.sow("intermediates", name, value)


MEAN_GROUPS = 2  # the groups a mean ablation averages within: the conditional and the unconditional half of CFG


def group_mean(z: jnp.ndarray, mean_group=None, valid=None) -> jnp.ndarray:
    """A mean ablation's replacement for z [B, Q, H, Dh]: at each position q, the float32 mean of z over the rows of
    the row's group where position q is valid. mean_group [B] int in [0, MEAN_GROUPS) (a negative row is in no group:
    it adds nothing and gets 0); None = one group of every row. valid [B, Q] (default: all) counts only the valid
    positions (an MM-DiT's caption tokens); a position valid in no row of a group gets 0."""
    rows = z.shape[0]
    onehot = jnp.ones((rows, 1)) if mean_group is None else jax.nn.one_hot(mean_group, MEAN_GROUPS)  # [B, G]
    weight = onehot[:, None, :] * (1.0 if valid is None else valid.astype(jnp.float32)[:, :, None])  # [B, Q, G]
    sums = jnp.einsum("bqg,bqhd->gqhd", weight, z.astype(jnp.float32))
    means = sums / jnp.maximum(weight.sum(0).T, 1.0)[:, :, None, None]
    return jnp.einsum("bg,gqhd->bqhd", onehot, means)


def partitioned(init, axes: tuple[str | None, ...]):
    """An initializer whose parameter carries logical sharding axis names."""
    return nn.with_logical_partitioning(init, axes)


def logical_dense(
    features: int,
    axes: tuple[str | None, str | None],
    dtype: Any,
    name: str,
    kernel_init=nn.initializers.xavier_uniform(),
) -> Dense:
    """A Dense layer (float32 params, `dtype` compute) with logical axes on kernel and bias.

    The default kernel init is xavier-uniform, as PixArt initialises its linear layers. The layer is `dense.Dense`
    (nn.Dense's parameters and maths, faster gradients on the CPU).
    """
    return Dense(
        features,
        dtype=dtype,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention; self-attention when `context` is None.

    head_mask [heads] multiplies each head's output z before the output projection (zero = ablate the head).
    head_mean_mask [heads] mean-ablates: z <- m * z + (1 - m) * mean(z), per query position the mean over the rows of
    the row's `mean_group` (see `group_mean`: under CFG each half is its own group, so a head keeps its average
    guidance contribution, and padding rows count in no group; values in between interpolate). It acts after
    head_mask.
    head_patch [B, heads] with patch_source [B] (int) patches: z <- z + w * (z[patch_source] - z), so row b's head
    reads row patch_source[b]'s output where w is 1 (activation patching between worlds laid along the batch; a row
    that is its own source is left bit-identical). It acts after both masks. hook_z records z after all of them, i.e.
    what the output projection actually reads. An argument left None adds no op.
    key_mask [B, Lk] (True = attend) masks padded keys. (A row with no valid key attends uniformly; diffusers'
    additive -10000 bias would instead fall back to unmasked attention there. Real captions always have a token.)
    """

    num_heads: int
    head_dim: int
    dtype: Any
    hook_prefix: str
    capture: tuple[str, ...] = ()
    zero_init_out: bool = False  # PixArt zero-initialises the cross-attention output projection

    def _record(self, hook: str, value: jnp.ndarray) -> None:
        sow_hook(self, f"{self.hook_prefix}.{hook}", value)

    @nn.compact
    def __call__(
        self,
        x,
        context=None,
        key_mask=None,
        head_mask=None,
        head_mean_mask=None,
        head_patch=None,
        patch_source=None,
        mean_group=None,
    ):
        inner = self.num_heads * self.head_dim
        source = x if context is None else context
        split = lambda y: y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))  # noqa: E731
        q = split(logical_dense(inner, (axes.EMBED, axes.HEADS), self.dtype, "to_q")(x))
        k = split(logical_dense(inner, (axes.EMBED, axes.HEADS), self.dtype, "to_k")(source))
        v = split(logical_dense(inner, (axes.EMBED, axes.HEADS), self.dtype, "to_v")(source))
        self._record("hook_q", q)  # [batch, query_pos, heads, head_dim]
        self._record("hook_k", k)  # [batch, key_pos, heads, head_dim]
        self._record("hook_v", v)  # [batch, key_pos, heads, head_dim]

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        pattern = nn.softmax(logits, axis=-1)
        self._record("hook_pattern", pattern)  # [batch, heads, query_pos, key_pos], float32, rows sum to 1

        z = jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(self.dtype), v)
        if head_mask is not None:
            z = z * head_mask.astype(z.dtype)[None, None, :, None]
        if head_mean_mask is not None:
            keep = head_mean_mask.astype(jnp.float32)[None, None, :, None]
            z = (keep * z.astype(jnp.float32) + (1 - keep) * group_mean(z, mean_group)).astype(z.dtype)
        if head_patch is not None:
            z = z + head_patch.astype(z.dtype)[:, None, :, None] * (z[patch_source] - z)
        self._record("hook_z", z)  # [batch, query_pos, heads, head_dim], after masks and patches
        out_init = nn.initializers.zeros_init() if self.zero_init_out else nn.initializers.xavier_uniform()
        to_out = logical_dense(x.shape[-1], (axes.HEADS, axes.EMBED), self.dtype, "to_out_0", kernel_init=out_init)
        return to_out(z.reshape(z.shape[:2] + (inner,)))
