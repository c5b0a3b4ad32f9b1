"""The CFG negative of sampling (sample.negative): the encoder's embedding of the empty caption, as the paper samples,
or the DiT's learned null caption, as caption dropout trains it."""

import jax
import numpy as np
import pytest

from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.models import dit
from relcirc_jax.text import conditioner, rte
from relcirc_jax.train import sampling


@pytest.fixture(scope="module")
def model():
    text = conditioner.make_text_conditioner("rte", dim=16, position_scale=0.5)
    cfg = dit.dit_config("nano", hidden_size=16, depth=1, num_heads=2, caption_channels=16)
    return text, dit.init_params(cfg, jax.random.PRNGKey(0))


def test_empty_prompt_is_the_encoders_embedding_of_no_words(model):
    text, params = model
    negative, mask = sampling.negative_caption("empty_prompt", text, params, text.tables, 3)
    assert negative.shape == (3, tokenizer.MAX_LEN, 16) and not np.asarray(mask).any()
    ids = np.zeros((1, tokenizer.MAX_LEN), np.int32)  # only padding
    expected = rte.rte_embed(text.tables["words"], ids, ids != 0, position_scale=0.5)
    np.testing.assert_array_equal(negative, np.broadcast_to(expected, negative.shape))
    assert sampling.caption_batch([""])["caption_index"][0] == prompts.EMPTY_CAPTION_INDEX


def test_learned_null_is_the_dits_null_caption(model):
    text, params = model
    negative, mask = sampling.negative_caption("learned_null", text, params, text.tables, 2)
    expected, expected_mask = dit.null_caption(params, 2)
    np.testing.assert_array_equal(negative, expected)
    np.testing.assert_array_equal(mask, expected_mask)
    assert not np.allclose(negative, sampling.negative_caption("empty_prompt", text, params, text.tables, 2)[0])


def test_unknown_negative_names_the_choices(model):
    text, params = model
    with pytest.raises(ValueError, match="Unknown CFG negative 'zeros'.*empty_prompt.*learned_null"):
        sampling.negative_caption("zeros", text, params, text.tables, 1)
