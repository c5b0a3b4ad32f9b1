"""DiT unit tests: configs, capture points, head masks (incl. vmap screens), bf16, remat, sharding annotations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import noisy

from relcirc_jax.models.dit import (
    DIT_SIZES,
    DiT,
    DiTConfig,
    dit_config,
    hook_names,
    init_params,
    logical_specs,
    null_caption,
    run_with_cache,
)

CONFIG = DiTConfig(
    image_size=16,
    patch_size=4,
    in_channels=3,
    hidden_size=32,
    depth=2,
    num_heads=2,
    caption_channels=16,
    max_text_len=5,
)


@pytest.fixture(scope="module")
def params():
    return noisy(init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    t = jnp.array([5.0, 900.0])
    text = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    return x, t, text, mask


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, inputs, config, self_head_mask, cross_head_mask):
    return DiT(config).apply(
        {"params": params}, *inputs, self_head_mask=self_head_mask, cross_head_mask=cross_head_mask
    )


def assert_close(actual, desired):
    """Jitted/eager/vmapped runs of the same math differ by float32 rounding only (outputs are O(10))."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-4)


def _apply(params, inputs, config=CONFIG, self_head_mask=None, cross_head_mask=None):
    return _forward(params, inputs, config, self_head_mask, cross_head_mask)


def test_sizes_and_config_errors():
    assert {k: (c.hidden_size, c.depth, c.num_heads) for k, c in ((k, dit_config(k)) for k in DIT_SIZES)} == {
        "b": (768, 12, 12),
        "mini": (384, 6, 6),
        "micro": (192, 6, 3),
        "nano": (192, 3, 3),
    }
    assert dit_config("nano", image_size=128, patch_size=16).grid_size == 8
    with pytest.raises(ValueError, match="b.*micro.*mini.*nano"):
        dit_config("huge")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DiTConfig(hidden_size=30, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiTConfig(image_size=60, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="dtype"):
        DiTConfig(hidden_size=32, depth=1, num_heads=2, dtype="float8")


def test_bad_inputs_name_the_problem(params, inputs):
    x, t, text, mask = inputs
    with pytest.raises(ValueError, match="NHWC"):
        _apply(params, (jnp.transpose(x, (0, 3, 1, 2)), t, text, mask))
    with pytest.raises(ValueError, match="caption_channels"):
        _apply(params, (x, t, text[..., :8], mask))
    with pytest.raises(ValueError, match="self_head_mask"):
        _apply(params, inputs, self_head_mask=jnp.ones((2, 3)))


def test_output_shape_and_learn_sigma(inputs):
    model = DiT(DiTConfig(**{**CONFIG.__dict__, "learn_sigma": True}))
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(1), *inputs), *inputs))
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


def test_capture_names_shapes_and_absence(params, inputs):
    names = [
        "hook_caption",
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_q",
        "blocks.1.cross_attn.hook_pattern",
        "blocks.1.cross_attn.hook_k",
        "blocks.1.cross_attn.hook_z",
        "blocks.0.hook_resid_mid",
        "blocks.1.hook_resid_post",
    ]
    out, cache = run_with_cache(DiT(CONFIG), params, *inputs, names)
    assert list(cache) == names
    shapes = {name: cache[name].shape for name in names}
    assert shapes == {
        "hook_caption": (2, 5, 32),
        "blocks.0.hook_resid_pre": (2, 16, 32),
        "blocks.0.attn.hook_pattern": (2, 2, 16, 16),
        "blocks.1.attn.hook_q": (2, 16, 2, 16),
        "blocks.1.cross_attn.hook_pattern": (2, 2, 16, 5),
        "blocks.1.cross_attn.hook_k": (2, 5, 2, 16),
        "blocks.1.cross_attn.hook_z": (2, 16, 2, 16),
        "blocks.0.hook_resid_mid": (2, 16, 32),
        "blocks.1.hook_resid_post": (2, 16, 32),
    }
    assert_close(out, _apply(params, inputs))
    pattern = cache["blocks.1.cross_attn.hook_pattern"]
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(pattern[0, :, :, 3:]).max()) == 0.0  # padded caption tokens get no attention

    _, state = DiT(CONFIG).apply({"params": params}, *inputs, mutable=["intermediates"])
    assert not jax.tree_util.tree_leaves(state)  # capture=() records nothing
    assert len(hook_names(CONFIG)) == 1 + CONFIG.depth * 13
    with pytest.raises(ValueError, match="blocks.7.attn.hook_pattern.*valid names"):
        run_with_cache(DiT(CONFIG), params, *inputs, ["blocks.7.attn.hook_pattern"])


def test_head_mask_of_ones_is_no_mask(params, inputs):
    ones = jnp.ones((CONFIG.depth, CONFIG.num_heads))
    assert_close(_apply(params, inputs, self_head_mask=ones, cross_head_mask=ones), _apply(params, inputs))


def test_zero_cross_heads_make_output_independent_of_text(params, inputs):
    x, t, text, mask = inputs
    zeros = jnp.zeros((CONFIG.depth, CONFIG.num_heads))
    other_text = (x, t, -3.0 * text, jnp.ones_like(mask))
    assert not np.allclose(_apply(params, inputs), _apply(params, other_text), atol=1e-3)
    assert_close(_apply(params, inputs, cross_head_mask=zeros), _apply(params, other_text, cross_head_mask=zeros))


def test_zeroing_one_head_acts_only_through_that_head(params, inputs):
    mask = jnp.ones((CONFIG.depth, CONFIG.num_heads)).at[0, 1].set(0.0)
    names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern"]
    full_out, full = run_with_cache(DiT(CONFIG), params, *inputs, names)
    out, ablated = run_with_cache(DiT(CONFIG), params, *inputs, names, self_head_mask=mask)
    np.testing.assert_array_equal(ablated["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"])
    np.testing.assert_array_equal(ablated["blocks.0.attn.hook_z"][:, :, 0], full["blocks.0.attn.hook_z"][:, :, 0])
    assert float(jnp.abs(ablated["blocks.0.attn.hook_z"][:, :, 1]).max()) == 0.0
    assert not np.allclose(out, full_out, atol=1e-4)


def test_vmap_over_masks_is_an_ablation_screen(params, inputs):
    masks = jnp.ones((CONFIG.depth * CONFIG.num_heads, CONFIG.depth, CONFIG.num_heads))
    masks = masks.at[jnp.arange(4), jnp.arange(4) // 2, jnp.arange(4) % 2].set(0.0)  # one ablated head per row
    screen = jax.jit(jax.vmap(lambda m: _apply(params, inputs, cross_head_mask=m)))(masks)
    assert screen.shape == (4, 2, 16, 16, 3)
    for i in (0, 3):
        assert_close(screen[i], _apply(params, inputs, cross_head_mask=masks[i]))


def test_bfloat16_compute_keeps_float32_params(params, inputs):
    config = DiTConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
    boxed = jax.eval_shape(lambda: DiT(config).init(jax.random.key(0), *inputs))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(nn.unbox(boxed)))
    out = _apply(params, inputs, config)
    reference = _apply(params, inputs)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out - reference).max()) < 0.1 * float(jnp.abs(reference).max())
    _, cache = run_with_cache(DiT(config), params, *inputs, ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"])
    assert cache["blocks.0.attn.hook_pattern"].dtype == jnp.float32  # softmax in float32
    assert cache["blocks.0.hook_resid_post"].dtype == jnp.bfloat16


def test_remat_matches_and_still_captures(params, inputs):
    config = DiTConfig(**{**CONFIG.__dict__, "remat": True})
    assert_close(_apply(params, inputs, config), _apply(params, inputs))
    grad = jax.jit(jax.grad(lambda p: jnp.mean(_apply(p, inputs, config) ** 2)))(params)
    kernel_grad = grad["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert bool(jnp.isfinite(kernel_grad).all()) and float(jnp.abs(kernel_grad).max()) > 0
    _, cache = run_with_cache(DiT(config), params, *inputs, ["blocks.1.cross_attn.hook_v"])
    assert cache["blocks.1.cross_attn.hook_v"].shape == (2, 5, 2, 16)


def test_sharding_annotations(params, inputs):
    boxed = jax.eval_shape(lambda: DiT(CONFIG).init(jax.random.key(0), *inputs))["params"]
    assert isinstance(boxed["transformer_blocks_0"]["attn1"]["to_q"]["kernel"], nn.LogicallyPartitioned)
    is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    assert not any(is_boxed(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_boxed))
    specs = logical_specs(CONFIG)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert jax.tree_util.tree_structure(specs, is_leaf=is_spec) == jax.tree_util.tree_structure(params)
    block = specs["transformer_blocks_1"]
    assert tuple(block["attn1"]["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(block["attn2"]["to_out_0"]["kernel"]) == ("heads", "embed")
    assert tuple(block["ff"]["net_0"]["proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(block["ff"]["net_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(block["scale_shift_table"]) == ("table", "embed")
    assert tuple(specs["adaln_single"]["linear"]["kernel"]) == ("embed", "adaln")
    assert tuple(specs["caption_projection"]["linear_1"]["kernel"]) == ("caption", "embed")
    assert tuple(specs["proj_out"]["kernel"]) == ("embed", "patch")


def test_null_caption(params):
    text, mask = null_caption(params, 3)
    assert text.shape == (3, 5, 16) and mask.shape == (3, 5) and bool(mask.all())
    np.testing.assert_array_equal(text[2], params["y_embedding"])
    np.testing.assert_array_equal(null_caption({"params": params}, 1)[0][0], params["y_embedding"])


def test_null_caption_rows_equal_feeding_the_null_caption(params, inputs):
    """Training's caption dropout swaps projected rows; that must equal projecting the swapped captions."""
    x, t, text, mask = inputs
    rows = jnp.array([True, False])
    null_text, null_mask = null_caption(params, 2)
    swapped_text = jnp.where(rows[:, None, None], null_text, text)
    swapped_mask = jnp.where(rows[:, None], null_mask, mask)
    expected = DiT(CONFIG).apply({"params": params}, x, t, swapped_text, swapped_mask)
    got = DiT(CONFIG).apply({"params": params}, x, t, text, mask, null_caption_rows=rows)
    assert_close(got, expected)
    assert not np.allclose(got[0], DiT(CONFIG).apply({"params": params}, x, t, text, mask)[0], atol=1e-3)
