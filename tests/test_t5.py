"""Flax T5 v1.1 encoder vs transformers' T5EncoderModel (torch CPU, float32) on a tiny random checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402

from relcirc_jax.text import hf_loading, t5  # noqa: E402

TOLERANCE = 1e-4


def _tiny_t5() -> "transformers.T5EncoderModel":
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    model = transformers.T5EncoderModel(config).eval()
    # The default init leaves the relative position bias near zero; make it matter.
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model


def _inputs():
    ids = np.random.default_rng(0).integers(1, 100, size=(3, 20)).astype(np.int64)
    mask = np.ones((3, 20), dtype=np.int64)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _max_error(model, path) -> float:
    ids, mask = _inputs()
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    config, params = t5.load_t5_encoder(str(path))
    got = jax.jit(lambda p, i, m: t5.t5_encode(config, p, i, m))(params, ids.astype(np.int32), mask.astype(bool))
    return float(np.max(np.abs(np.asarray(got) - expected)))


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_t5()


def test_matches_transformers_safetensors(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    error = _max_error(tiny_model, tmp_path)
    print(f"T5 safetensors max abs error {error:.2e}")
    assert error <= TOLERANCE


def test_matches_transformers_pytorch_bin(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert _max_error(tiny_model, tmp_path) <= TOLERANCE


def test_matches_transformers_sharded(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    assert _max_error(tiny_model, tmp_path) <= TOLERANCE


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    rounded = _tiny_t5().to(torch.bfloat16)
    rounded.save_pretrained(tmp_path)  # safetensors with BF16 tensors, as large checkpoints are often stored
    assert _max_error(rounded.float(), tmp_path) <= TOLERANCE


def test_decoder_weights_ignored_and_bfloat16(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    loaded_config, params = t5.load_t5_encoder(str(tmp_path), dtype=jnp.bfloat16)
    assert set(params) == {"embed_tokens", "relative_attention_bias", "final_norm", "block_0"}
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    out = t5.t5_encode(loaded_config, params, np.ones((1, 20), np.int32), np.ones((1, 20), bool))
    assert out.shape == (1, 20, 16) and out.dtype == jnp.float32


def test_relu_t5_rejected_and_missing_dir_explained(tmp_path):
    with pytest.raises(ValueError, match="gated-gelu"):
        t5.T5EncoderConfig.from_hf({"feed_forward_proj": "relu"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_loading.read_config(str(tmp_path / "nowhere"))
