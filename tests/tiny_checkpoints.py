"""Small Hugging Face checkpoints written by the tests themselves (nothing is downloaded): a T5 encoder with a fast
tokenizer, and a diffusers PixArt transformer with random weights in every layer."""

import os
import shutil

from relcirc_jax.text import bert

# A fast tokenizer that ships with an installed package (the MiniLM of sentence-transformers); any one works for T5.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def tiny_t5(path, *, d_model: int = 16, with_tokenizer: bool = True) -> str:
    """Writes a 1-layer gated-GELU T5 encoder (transformers save_pretrained) and, optionally, a tokenizer to `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=30522, d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
    )
    transformers.T5EncoderModel(config).save_pretrained(path)
    if with_tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(os.path.join(bert.minilm_dir(), name), os.path.join(path, name))
    return str(path)


def tiny_pixart(path, *, caption_channels: int = 16, in_channels: int = 3, std: float = 0.05, seed: int = 0) -> str:
    """Writes a diffusers PixArtTransformer2DModel (2 layers x 2 heads of 16, 128 px in 16 px patches, so diffusers'
    position interpolation scale is 2) whose every parameter, the zero-initialised ones included, is N(0, std)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=128,
        patch_size=16,
        caption_channels=caption_channels,
        use_additional_conditions=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    model.save_pretrained(path)
    return str(path)
