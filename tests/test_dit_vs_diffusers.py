"""Oracle test: our Flax DiT equals diffusers' PixArtTransformer2DModel (torch CPU) on the same saved weights."""

import dataclasses

import diffusers  # noqa: E402
import numpy as np
import pytest
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from relcirc_jax.models.convert import (  # noqa: E402
    diffusers_config,
    diffusers_to_flax,
    flax_to_diffusers,
    load_pixart_checkpoint,
)
from relcirc_jax.models.dit import DiT, DiTConfig  # noqa: E402

TOLERANCE = 1e-4
# A latent-like grid (sample 8, patch 2, learned sigma) and our pixel-space layouts (64 px / patch 8 and
# 128 px / patch 16 -> 8x8 tokens; 128 px also checks the position-embedding interpolation_scale 2).
TINY_CONFIGS = {
    "latent_8_p2": DiTConfig(
        image_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        caption_channels=16,
        learn_sigma=True,
    ),
    "pixel_64_p8": DiTConfig(
        image_size=64, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, caption_channels=16
    ),
    "pixel_128_p16": DiTConfig(
        image_size=128, patch_size=16, in_channels=3, hidden_size=32, depth=1, num_heads=2, caption_channels=16
    ),
}


def _torch_model(config: DiTConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(**diffusers_config(config)).eval()
    with torch.no_grad():  # diffusers' default init is fine, but make every tensor O(0.1) and non-trivial
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _inputs(config: DiTConfig, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, config.image_size, config.image_size, config.in_channels)).astype(np.float32)
    t = np.array([3.0, 731.5], np.float32)
    text = rng.normal(size=(2, 5, config.caption_channels)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return x, t, text, mask


def _torch_output(model, x, t, text, mask) -> torch.Tensor:
    """diffusers' output in our layout [batch, height, width, channels], with autograd."""
    out = model(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        encoder_hidden_states=torch.from_numpy(text),
        timestep=torch.from_numpy(t),
        encoder_attention_mask=torch.from_numpy(mask).long(),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    return out.permute(0, 2, 3, 1)


def _torch_forward(model, x, t, text, mask) -> np.ndarray:
    with torch.no_grad():
        return _torch_output(model, x, t, text, mask).numpy()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_forward_matches_diffusers(name, tmp_path):
    config = TINY_CONFIGS[name]
    torch_model = _torch_model(config)
    torch_model.save_pretrained(tmp_path)
    loaded_config, params = load_pixart_checkpoint(str(tmp_path))
    assert loaded_config == config

    x, t, text, mask = _inputs(config)
    ours = np.asarray(DiT(config).apply({"params": params}, x, t, text, mask))
    theirs = _torch_forward(torch_model, x, t, text, mask)
    error = float(np.abs(ours - theirs).max())
    print(f"{name}: max |flax - diffusers| = {error:.3g} (output scale {np.abs(theirs).max():.3g})")
    assert ours.shape == theirs.shape
    assert error <= TOLERANCE


def test_a_smaller_image_on_the_larger_images_position_grid_matches_diffusers():
    """Progressive resolution: diffusers' PixArt built for 64 px and fed 32 px images spaces the 4x4 grid's positions
    as its 8x8 grid's (0, 2, 4, 6: PatchEmbed's base_size); ours does with pos_embed_image_size=64 at 32 px."""
    config = TINY_CONFIGS["pixel_64_p8"]
    torch_model = _torch_model(config)
    params = diffusers_to_flax(torch_model.state_dict(), config)
    small = dataclasses.replace(config, image_size=32, pos_embed_image_size=64)
    x, t, text, mask = _inputs(small)
    theirs = _torch_forward(torch_model, x, t, text, mask)
    ours = np.asarray(DiT(small).apply({"params": params}, x, t, text, mask))
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert float(np.abs(ours - theirs).max()) <= TOLERANCE
    own_grid = np.asarray(
        DiT(dataclasses.replace(small, pos_embed_image_size=None)).apply({"params": params}, x, t, text, mask)
    )
    assert float(np.abs(own_grid - theirs).max()) > 100 * TOLERANCE  # the knob is what makes them agree


def test_padding_tokens_are_ignored(tmp_path):
    config = TINY_CONFIGS["pixel_64_p8"]
    params = diffusers_to_flax(_torch_model(config).state_dict(), config)
    x, t, text, mask = _inputs(config)
    garbage = text.copy()
    garbage[0, 3:] = 100.0  # padded positions of the first caption
    model = DiT(config)
    np.testing.assert_allclose(
        model.apply({"params": params}, x, t, text, mask),
        model.apply({"params": params}, x, t, garbage, mask),
        atol=1e-6,
    )


def test_round_trip_and_single_file(tmp_path):
    config = TINY_CONFIGS["latent_8_p2"]
    state = {k: v.numpy() for k, v in _torch_model(config).state_dict().items()}
    params = diffusers_to_flax(state, config)
    back = flax_to_diffusers(params)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)

    file = tmp_path / "weights.safetensors"
    save_file({k: torch.tensor(v) for k, v in flax_to_diffusers(params, include_null_caption=True).items()}, str(file))
    with pytest.raises(ValueError, match="num_heads"):
        load_pixart_checkpoint(str(file))
    loaded_config, loaded = load_pixart_checkpoint(str(file), num_heads=2, image_size=8, max_text_len=20)
    assert loaded_config == config
    np.testing.assert_array_equal(loaded["y_embedding"], params["y_embedding"])


def test_key_errors_name_the_keys():
    config = TINY_CONFIGS["latent_8_p2"]
    state = dict(_torch_model(config).state_dict())
    del state["transformer_blocks.1.attn2.to_k.bias"]
    state["transformer_blocks.1.attn2.extra.weight"] = torch.zeros(1)
    named_both = r"missing keys \['transformer_blocks\.1\.attn2\.to_k\.bias'\].*attn2\.extra\.weight"
    with pytest.raises(ValueError, match=named_both):
        diffusers_to_flax(state, config)


def test_unsupported_diffusers_config_is_refused(tmp_path):
    from relcirc_jax.models.convert import dit_config_from_diffusers

    with pytest.raises(ValueError, match="use_additional_conditions"):
        dit_config_from_diffusers({**diffusers_config(TINY_CONFIGS["latent_8_p2"]), "use_additional_conditions": True})


@pytest.mark.parametrize("name", ["latent_8_p2", "pixel_64_p8"])
def test_parameter_gradients_match_diffusers_autograd(name):
    # The backward pass against torch autograd: every Dense layer's weight gradient is our own VJP
    # (models/dense.py). Loss = <output, fixed random weights>, so every output element sends a gradient.
    import jax

    config = TINY_CONFIGS[name]
    torch_model = _torch_model(config)
    x, t, text, mask = _inputs(config)
    weights = np.random.default_rng(2).normal(size=_torch_forward(torch_model, x, t, text, mask).shape)
    (_torch_output(torch_model, x, t, text, mask) * torch.from_numpy(weights).float()).sum().backward()
    torch_grads = {
        key: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
        for key, p in torch_model.named_parameters()
    }
    theirs = diffusers_to_flax(torch_grads, config)  # the layout map is linear, so it carries gradients too

    params = diffusers_to_flax(torch_model.state_dict(), config)
    model = DiT(config)
    loss = lambda p: (model.apply({"params": p}, x, t, text, mask) * weights).sum()  # noqa: E731
    ours = jax.grad(loss)(params)
    flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    assert set(flat_ours) == set(flat_theirs)
    # per leaf relative to its scale, with a floor for the gradients that are 0 in exact arithmetic (a key bias
    # shifts every logit of a query alike) and float noise here
    floor = 1e-6 * max(float(np.abs(g).max()) for g in flat_theirs.values())
    for path, grad in flat_ours.items():
        if path[0].key == "y_embedding":
            continue  # the null caption: diffusers has no such parameter, both sides are 0
        expected = flat_theirs[path]
        error = float(np.abs(np.asarray(grad) - expected).max())
        assert error <= 1e-4 * float(np.abs(expected).max()) + floor, (jax.tree_util.keystr(path), error)
