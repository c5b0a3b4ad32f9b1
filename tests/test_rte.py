"""Random text embeddings: deterministic word tables, the sinusoidal position encoding on/off, padding handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relcirc_jax.data import prompts
from relcirc_jax.text import rte

# word_table(0, 24 words, 4096) as pretrained/rte_* were trained with it: its first and last entries, sum of |x|
SHIPPED_TABLE_FIRST = [0.19015338, 0.23733571, -0.05081185, -0.00921297]
SHIPPED_TABLE_LAST = [0.16247104, 0.00602856, -0.18804693, -0.05349243]
SHIPPED_TABLE_ABS_SUM = 9206.5088


def test_word_table_is_a_pure_function_of_seed_vocab_and_dim():
    a = np.asarray(rte.word_table(0, 30, 64))
    np.testing.assert_array_equal(a, np.asarray(rte.word_table(0, 30, 64)))
    assert not np.allclose(a, np.asarray(rte.word_table(1, 30, 64)))
    assert a.shape == (30, 64) and a.dtype == np.float32


def test_word_table_is_the_one_the_shipped_models_were_trained_with_whatever_the_prng_flags():
    """pretrained/rte_* store no word table: it is drawn again at load, so a JAX upgrade that changed these draws, or
    another default PRNG (rbg on TPUs, jax_threefry_partitionable), would hand them other word vectors silently.
    (Values, not bits: XLA's optimisation level moves the last bit.)"""

    def check():
        table = np.asarray(rte.word_table(0, len(prompts.VOCAB), 4096))
        np.testing.assert_allclose(table[0, :4], SHIPPED_TABLE_FIRST, atol=1e-6)
        np.testing.assert_allclose(table[-1, -4:], SHIPPED_TABLE_LAST, atol=1e-6)
        np.testing.assert_allclose(np.abs(table).sum(), SHIPPED_TABLE_ABS_SUM, rtol=1e-6)

    check()
    previous = jax.config.jax_default_prng_impl
    try:
        jax.config.update("jax_default_prng_impl", "rbg")
        with jax.threefry_partitionable(False):
            check()
    finally:
        jax.config.update("jax_default_prng_impl", previous)


def test_word_vectors_have_the_papers_scale():
    table = np.asarray(rte.word_table(0, 64, 4096))
    np.testing.assert_allclose(table.std(), 7.5 / 64.0, rtol=0.01)  # element std 7.5 / sqrt(4096)
    np.testing.assert_allclose(np.linalg.norm(table, axis=-1).mean(), 7.5, rtol=0.02)


def test_sinusoid_matches_the_transformer_formula():
    table = rte.sinusoidal_positions(20, 8)
    p, i = 7, 3
    np.testing.assert_allclose(table[p, 2 * i], np.sin(p / 10000 ** (2 * i / 8)), rtol=1e-5)
    np.testing.assert_allclose(table[p, 2 * i + 1], np.cos(p / 10000 ** (2 * i / 8)), rtol=1e-5)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)


def test_position_encoding_on_and_off():
    words = rte.word_table(0, 10, 16)
    ids = jnp.array([[3, 3, 4, 0]], jnp.int32)
    mask = ids != 0
    embed = jax.jit(rte.rte_embed, static_argnames=("position_scale", "zero_padding"))
    nopos = embed(words, ids, mask, position_scale=0.0)
    np.testing.assert_array_equal(nopos[0, 0], nopos[0, 1])  # same word, same vector without positions
    np.testing.assert_array_equal(nopos[0, 3], words[0])  # padding keeps the pad word's vector, as in the paper
    withpos = embed(words, ids, mask, position_scale=0.5)
    np.testing.assert_allclose(withpos - nopos, 0.5 * rte.sinusoidal_positions(4, 16)[None], atol=1e-6)
    zeroed = embed(words, ids, mask, position_scale=0.5, zero_padding=True)
    np.testing.assert_array_equal(zeroed[0, 3], 0.0)
    np.testing.assert_array_equal(zeroed[0, :3], withpos[0, :3])


def test_bad_table_shape_rejected():
    with pytest.raises(ValueError, match="even dim"):
        rte.word_table(0, 10, 7)
