"""Flax BERT encoder vs transformers' BertModel (tiny random, float32), and the real all-MiniLM-L6-v2 weights vs
sentence-transformers, all offline on torch CPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from relcirc_jax.text import bert  # noqa: E402

TOLERANCE = 1e-4
CAPTIONS = [
    "blue triangle is to the upper left of red square",
    "circle is above the square",
    "red circle is below square",
]


def test_tiny_bert_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(1, 99, size=(3, 20))
    mask = np.ones((3, 20), np.int64)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    loaded, params = bert.load_bert_encoder(str(tmp_path))
    got = jax.jit(lambda p, i, m: bert.bert_encode(loaded, p, i, m))(params, ids.astype(np.int32), mask.astype(bool))
    error = float(np.max(np.abs(np.asarray(got) - expected)))
    print(f"tiny BERT max abs error {error:.2e}")
    assert error <= TOLERANCE


def test_minilm_sentence_embeddings_match_sentence_transformers():
    import sentence_transformers

    path = bert.minilm_dir()
    reference = sentence_transformers.SentenceTransformer(path, device="cpu")
    expected = reference.encode(CAPTIONS, convert_to_numpy=True)
    tokens = transformers.AutoTokenizer.from_pretrained(path)(
        CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="np"
    )
    config, params = bert.load_minilm()
    mask = tokens["attention_mask"].astype(bool)
    hidden = bert.bert_encode(config, params, tokens["input_ids"].astype(np.int32), mask)
    got = np.asarray(bert.sentence_embeddings(hidden, mask))
    error = float(np.max(np.abs(got - expected)))
    print(f"MiniLM sentence embedding max abs error {error:.2e}")
    assert got.shape == (3, 384) and error <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


def test_unsupported_bert_variant_rejected():
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.from_hf({"hidden_act": "relu"})
