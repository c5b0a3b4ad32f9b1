"""The one text interface the trainer uses: a TextConditioner whose embed(tables, batch) is a pure jittable function
from a batch dict ("ids", "mask", "caption_index") to (text float[B, 20, dim], mask bool[B, 20]).

RTE kinds embed word ids on the fly from a [V, dim] word table; frozen encoders (T5, MiniLM) gather rows of a table
computed once per caption (text/cache.py), so batch["caption_index"] must index the same caption list.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from relcirc_jax.data import prompts
from relcirc_jax.text import bert, cache, rte

KINDS = ("rte", "rte_nopos", "t5", "minilm")
_T5_HELP = (
    "T5-XXL cannot be downloaded here: put a local copy of google/t5-v1_1-xxl (config.json, pytorch_model*.bin or "
    "model*.safetensors, and its tokenizer files) on disk and pass its directory as t5_path "
    "(config: --config.text.t5_path=/path/to/t5-v1_1-xxl)."
)


class TextConditioner(NamedTuple):
    name: str
    dim: int
    tables: Any  # pytree of arrays, passed into jit as an argument (not baked in as constants)
    embed: Callable  # embed(tables, batch) -> (text float32[B, L, dim], mask bool[B, L])
    token_roles: Optional[np.ndarray] = None  # int8[num_captions, L] role ids of cached encoders' tokens


def _rte_embed(tables, batch, *, position_scale: float):
    mask = jnp.asarray(batch["mask"], bool)
    return rte.rte_embed(tables["words"], batch["ids"], mask, position_scale=position_scale), mask


def _cached_embed(tables, batch):
    index = batch["caption_index"]
    return jnp.take(tables["text"], index, axis=0), jnp.take(tables["mask"], index, axis=0)


def _rte_conditioner(kind: str, seed: int, dim: int, position_scale: float) -> TextConditioner:
    scale = position_scale if kind == "rte" else 0.0
    words = rte.word_table(seed, len(prompts.VOCAB), dim)
    return TextConditioner(kind, dim, {"words": words}, functools.partial(_rte_embed, position_scale=scale))


def _cached_conditioner(kind: str, table: cache.TextTable) -> TextConditioner:
    tables = {"text": jnp.asarray(table.embeddings), "mask": jnp.asarray(table.mask)}
    return TextConditioner(kind, table.embeddings.shape[-1], tables, _cached_embed, table.roles)


def make_text_conditioner(
    kind: str,
    *,
    seed: int = 0,
    dim: int = 4096,
    position_scale: float = 1.0,
    t5_path: Optional[str] = None,
    workdir: Optional[str] = None,
    captions: Optional[Sequence[str]] = None,
) -> TextConditioner:
    """The text conditioner `kind` (one of KINDS).

    rte / rte_nopos: word table from (seed, len(VOCAB), dim); position_scale multiplies the sinusoid (rte only; the
    paper's runs used rte.PAPER_POSITION_SCALE = 1/6). t5 / minilm: dim comes from the encoder (4096 for T5-XXL, 384
    for MiniLM); the table over `captions` (default prompts.all_captions() and then the empty caption, the
    row prompts.EMPTY_CAPTION_INDEX) is cached under workdir/text_cache.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown text encoder kind {kind!r}; choose one of {KINDS}")
    if kind in ("rte", "rte_nopos"):
        return _rte_conditioner(kind, seed, dim, position_scale)
    captions = tuple(prompts.all_captions() + ("",) if captions is None else captions)
    if kind == "t5":
        if t5_path is None:
            raise ValueError(_T5_HELP)
        return _cached_conditioner(kind, cache.cached_text_table("t5", "t5", t5_path, captions, workdir))
    return _cached_conditioner(kind, cache.cached_text_table("minilm", "bert", bert.minilm_dir(), captions, workdir))
