"""Random text embeddings (RTE): a fixed random vector per vocabulary word plus a sinusoidal position encoding;
RTE-nopos is the same with position_scale=0. The paper's stand-in for T5 that keeps word identity and order only.

Facts from the paper's code (Animadversio/DiffusionObjectRelation, RandomEmbeddingEncoder[_wPosEmb]):
  - word vectors are N(0, 1) / sqrt(dim) * 7.5, i.e. element std 7.5 / sqrt(dim) (0.117 at dim 4096), norm about 7.5;
  - the position encoding is the Transformer sinusoid (sin on even, cos on odd channels, base 10000), multiplied by
    wpe_scale (1/6 in their experiments, see PAPER_POSITION_SCALE) and added at every position;
  - padding is not zeroed: the pad token has its own random vector and gets the position encoding too; the mask goes
    along unchanged. zero_padding=True is offered as a variant.
"""

import jax
import jax.numpy as jnp
import numpy as np

WORD_VECTOR_NORM = 7.5
PAPER_POSITION_SCALE = 1.0 / 6.0


def word_table(seed: int, vocab_size: int, dim: int = 4096) -> jax.Array:
    """float32[vocab_size, dim] random word vectors, a pure function of (seed, vocab_size, dim)."""
    if vocab_size < 1 or dim < 2 or dim % 2:
        raise ValueError(
            f"word_table needs vocab_size >= 1 and an even dim >= 2, got vocab_size={vocab_size}, dim={dim}"
        )
    # Pinned PRNG: a model's word vectors must not change with jax_default_prng_impl (rbg on TPUs) or
    # jax_threefry_partitionable; the shipped RTE models were trained with these (tests/test_rte.py checks the bits).
    with jax.threefry_partitionable(True):
        normal = jax.random.normal(jax.random.key(seed, impl="threefry2x32"), (vocab_size, dim), jnp.float32)
    return normal * (WORD_VECTOR_NORM / np.sqrt(dim))


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """float32[length, dim] Transformer position encoding: sin(p / 10000^(2i/dim)) at 2i, cos at 2i + 1."""
    position = np.arange(length, dtype=np.float32)[:, None]
    frequency = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(np.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency)
    return table


def rte_embed(words: jax.Array, ids, mask, *, position_scale: float, zero_padding: bool = False) -> jax.Array:
    """float32[N, L, D] = words[ids] + position_scale * sinusoid[L]; jittable. zero_padding zeroes masked positions."""
    embedded = jnp.take(words, ids, axis=0)
    if position_scale:
        embedded = embedded + position_scale * sinusoidal_positions(ids.shape[-1], words.shape[-1])
    if zero_padding:
        embedded = jnp.where(jnp.asarray(mask, bool)[..., None], embedded, 0.0)
    return embedded
