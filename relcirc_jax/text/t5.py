"""Flax Linen T5 v1.1 encoder (the frozen text encoder of PixArt / the paper's T5 models) and its Hugging Face loader.

Matches transformers' T5EncoderModel: RMS layer norm without mean or bias, unscaled dot-product attention with a
bidirectional bucketed relative position bias computed once (layer 0's table) and shared by all layers, gated-GELU
(tanh approximation, "gelu_new") feed-forward, no biases, a final layer norm.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.text import hf_loading


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hf(cls, hf_config: dict) -> "T5EncoderConfig":
        """From a transformers T5 config.json dict; only T5 v1.1 ("gated-gelu") checkpoints are supported."""
        ffn = hf_config.get("feed_forward_proj", "relu")
        if ffn != "gated-gelu":
            raise ValueError(
                f"T5 checkpoint has feed_forward_proj={ffn!r}; this encoder implements T5 v1.1 ('gated-gelu') only "
                "(e.g. google/t5-v1_1-xxl as used by PixArt)."
            )
        return hf_loading.config_from_hf(cls, hf_config)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of (key position - query position) for every [query, key] pair, int32[L, L]."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int32) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # Log-spaced buckets beyond max_exact (clamped to 1 only to keep log finite where the small branch is taken).
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(np.int32)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""

    epsilon: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return scale * (x * jax.lax.rsqrt(variance + self.epsilon)).astype(self.param_dtype)


def _dense(features: int, name: str, param_dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name, dtype=param_dtype, param_dtype=param_dtype)


class T5SelfAttention(nn.Module):
    config: T5EncoderConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, position_bias, mask):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.d_kv))
        q, k, v = (split(_dense(inner, n, self.param_dtype)(x)) for n in ("q", "k", "v"))
        # T5 folds the 1/sqrt(d) scaling into its initialisation: scores are not scaled.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + position_bias
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (inner,))
        return _dense(cfg.d_model, "o", self.param_dtype)(out)


class T5GatedFeedForward(nn.Module):
    config: T5EncoderConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = nn.gelu(_dense(cfg.d_ff, "wi_0", self.param_dtype)(x), approximate=True)
        return _dense(cfg.d_model, "wo", self.param_dtype)(gate * _dense(cfg.d_ff, "wi_1", self.param_dtype)(x))


class T5EncoderBlock(nn.Module):
    config: T5EncoderConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, position_bias, mask):
        eps, dtype = self.config.layer_norm_epsilon, self.param_dtype
        x = x + T5SelfAttention(self.config, dtype, name="attention")(
            T5LayerNorm(eps, dtype, name="attention_norm")(x), position_bias, mask
        )
        return x + T5GatedFeedForward(self.config, dtype, name="ffn")(T5LayerNorm(eps, dtype, name="ffn_norm")(x))


class T5Encoder(nn.Module):
    """ids int[B, L], mask bool[B, L] (True = real token) -> last hidden state [B, L, d_model] (dtype of the params)."""

    config: T5EncoderConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        cfg = self.config
        x = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=self.param_dtype, param_dtype=self.param_dtype, name="embed_tokens"
        )(ids)
        buckets = relative_position_buckets(
            ids.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias_table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            param_dtype=self.param_dtype,
            name="relative_attention_bias",
        )
        position_bias = jnp.transpose(bias_table(buckets), (2, 0, 1))[None].astype(jnp.float32)  # [1, H, Lq, Lk]
        mask = mask.astype(bool)
        for layer in range(cfg.num_layers):
            x = T5EncoderBlock(cfg, self.param_dtype, name=f"block_{layer}")(x, position_bias, mask)
        return T5LayerNorm(cfg.layer_norm_epsilon, self.param_dtype, name="final_norm")(x)


def _block_params(state: dict, layer: int, dtype) -> dict:
    prefix = f"encoder.block.{layer}.layer."
    dense = lambda name: {"kernel": hf_loading.dense_kernel(state[prefix + name + ".weight"], dtype)}
    norm = lambda name: {"scale": hf_loading.as_param(state[prefix + name + ".weight"], dtype)}
    return {
        "attention_norm": norm("0.layer_norm"),
        "attention": {n: dense(f"0.SelfAttention.{n}") for n in ("q", "k", "v", "o")},
        "ffn_norm": norm("1.layer_norm"),
        "ffn": {n: dense(f"1.DenseReluDense.{n}") for n in ("wi_0", "wi_1", "wo")},
    }


def t5_params_from_state(config: T5EncoderConfig, state: dict, dtype=jnp.float32) -> dict:
    """Flax params of T5Encoder from a transformers T5 state dict (HF names -> numpy)."""
    embedding = state.get("encoder.embed_tokens.weight", state.get("shared.weight"))
    if embedding is None:
        raise KeyError("T5 checkpoint has neither 'shared.weight' nor 'encoder.embed_tokens.weight'.")
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    params = {
        "embed_tokens": {"embedding": hf_loading.as_param(embedding, dtype)},
        "relative_attention_bias": {"embedding": hf_loading.as_param(bias, dtype)},
        "final_norm": {"scale": hf_loading.as_param(state["encoder.final_layer_norm.weight"], dtype)},
    }
    params.update({f"block_{i}": _block_params(state, i, dtype) for i in range(config.num_layers)})
    return params


def _is_encoder_weight(key: str) -> bool:
    return key.startswith("encoder.") or key == "shared.weight"


def load_t5_encoder(path: str, dtype=jnp.float32) -> tuple[T5EncoderConfig, dict]:
    """(config, params) of the T5 v1.1 encoder in the local HF checkpoint directory `path` (decoder weights skipped).

    dtype=jnp.bfloat16 halves the memory of T5-XXL (about 9.5 GB instead of 19 GB for the encoder).
    """
    return hf_loading.load_encoder(path, T5EncoderConfig, t5_params_from_state, _is_encoder_weight, dtype)


def t5_encode(config: T5EncoderConfig, params: dict, ids, mask):
    """Encoder output float32[B, L, d_model] for token ids and a padding mask (jittable given a static config)."""
    dtype = params["final_norm"]["scale"].dtype
    return T5Encoder(config, dtype).apply({"params": params}, ids, mask).astype(jnp.float32)
