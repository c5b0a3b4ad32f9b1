"""Oracle and unit tests of the MM-DiT (models/mmdit.py) against diffusers' SD3Transformer2DModel (torch CPU).

diffusers' joint attention takes no text mask, so a padded caption is compared with diffusers run on that caption cut
to its valid tokens (and pooled over them): masking a key must equal removing the token.
"""

import dataclasses
import functools

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from relcirc_jax.models import arch, dit, mmdit
from relcirc_jax.models.convert import mmdit_params_from_diffusers, mmdit_params_to_diffusers, sd3_config
from relcirc_jax.parallel import axes, rules

RELATIVE_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|, float32
CONFIGS = {
    # 4x4 tokens, two blocks (a full one, then the context_pre_only one), QK RMSNorm
    "tiny_16_p4": mmdit.MMDiTConfig(
        image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, caption_channels=24, max_text_len=5
    ),
    # our pixel layout (64 px, patch 8 -> 8x8 tokens), learned sigma, SD3.0 blocks (no QK norm)
    "pixel_64_p8": mmdit.MMDiTConfig(
        image_size=64,
        patch_size=8,
        hidden_size=48,
        depth=2,
        num_heads=3,
        caption_channels=16,
        max_text_len=5,
        learn_sigma=True,
        qk_norm=False,
    ),
}
TINY = CONFIGS["tiny_16_p4"]


def _torch_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**sd3_config(config)).eval()
    with torch.no_grad():  # make every tensor O(0.1) and non-trivial (RMSNorm scales stay near 1)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _inputs(config, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, config.image_size, config.image_size, config.in_channels)).astype(np.float32)
    t = np.array([3.0, 731.5], np.float32)
    text = rng.normal(size=(2, 5, config.caption_channels)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)  # row 0: tokens 2 and 4 are padding
    return x, t, text, mask


def _diffusers_forward(model, x, t, text, mask) -> np.ndarray:
    """diffusers on each row's valid tokens only, pooled = their mean; NHWC out."""
    outs = []
    for row in range(x.shape[0]):
        valid = text[row : row + 1, mask[row]]
        with torch.no_grad():
            out = model(
                hidden_states=torch.from_numpy(x[row : row + 1]).permute(0, 3, 1, 2),
                encoder_hidden_states=torch.from_numpy(valid),
                pooled_projections=torch.from_numpy(valid.mean(axis=1)),
                timestep=torch.from_numpy(t[row : row + 1]),
            ).sample
        outs.append(out.permute(0, 2, 3, 1).numpy())
    return np.concatenate(outs)


@functools.cache
def _jitted(config, names: tuple[str, ...]):
    if names:
        return jax.jit(lambda p, i, k: mmdit.run_with_cache(mmdit.MMDiT(config), p, *i, list(names), **k))
    return jax.jit(lambda p, i, k: (mmdit.MMDiT(config).apply({"params": p}, *i, **k), {}))


def _forward(config, params, inputs, names=(), **kwargs):
    """(output, {hook: value}) of one jitted forward pass; params, inputs and interventions are arguments, so calls
    that differ only in their values share one compiled program."""
    out, cache = _jitted(config, tuple(names))(params, tuple(jnp.asarray(a) for a in inputs), kwargs)
    return np.asarray(out), {name: np.asarray(value) for name, value in cache.items()}


@functools.cache
def _block_forward(context_pre_only: bool):
    block = mmdit.JointTransformerBlock(TINY, 0, context_pre_only=context_pre_only)
    return jax.jit(lambda p, *streams: block.apply({"params": p}, *streams))


def _relative_error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def tiny():
    """(torch model, converted Flax params) of TINY, shared by the unit tests."""
    model = _torch_model(TINY)
    return model, mmdit_params_from_diffusers(model.state_dict(), TINY)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name):
    config = CONFIGS[name]
    model = _torch_model(config)
    params = mmdit_params_from_diffusers(model.state_dict(), config)
    inputs = _inputs(config)
    ours, _ = _forward(config, params, inputs)
    theirs = _diffusers_forward(model, *inputs)
    error = _relative_error(ours, theirs)
    print(f"{name}: forward max |flax - diffusers| / max |diffusers| = {error:.3g} (scale {np.abs(theirs).max():.3g})")
    assert ours.shape == theirs.shape == (2, config.image_size, config.image_size, config.out_channels)
    assert error <= RELATIVE_TOLERANCE


def test_blocks_match_diffusers(tiny):
    """Every JointTransformerBlock, both streams, on random streams and conditioning; the last is context_pre_only."""
    model, params = tiny
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, TINY.num_patches, TINY.hidden_size)).astype(np.float32)
    c = rng.normal(size=(2, 5, TINY.hidden_size)).astype(np.float32)
    temb = rng.normal(size=(2, TINY.hidden_size)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    for layer, torch_block in enumerate(model.transformer_blocks):
        last = layer == TINY.depth - 1
        assert torch_block.context_pre_only == last
        with torch.no_grad():
            their_c, their_h = torch_block(torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(temb))
        our_h, our_c = _block_forward(last)(params[f"transformer_blocks_{layer}"], h, c, temb, mask)
        image_error = _relative_error(our_h, their_h.numpy())
        print(f"block {layer}: image stream relative error {image_error:.3g}", end="")
        assert image_error <= RELATIVE_TOLERANCE
        if last:
            assert our_c is None and their_c is None
            print(" (context_pre_only: no text output)")
        else:
            text_error = _relative_error(our_c, their_c.numpy())
            print(f", text stream {text_error:.3g}")
            assert text_error <= RELATIVE_TOLERANCE


def test_round_trip_and_key_errors(tiny):
    model, params = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = mmdit_params_to_diffusers(params)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert params["transformer_blocks_0"]["attn"]["norm_added_q"]["scale"].shape == (TINY.head_dim,)

    broken = dict(state)
    del broken["transformer_blocks.1.attn.add_q_proj.bias"]
    broken["transformer_blocks.1.attn.to_add_out.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(
        ValueError, match=r"missing keys \['transformer_blocks\.1\.attn\.add_q_proj\.bias'\].*to_add_out"
    ):
        mmdit_params_from_diffusers(broken, TINY)
    # A persistent position-embedding buffer is checked: SD3's cropped 96x96 table spaces positions differently.
    ours = {**state, "pos_embed.pos_embed": mmdit.sincos_position_embedding(TINY)[None]}
    mmdit_params_from_diffusers(ours, TINY)
    sd3_table = diffusers.models.embeddings.get_2d_sincos_pos_embed(TINY.hidden_size, 96, base_size=TINY.grid_size)
    with pytest.raises(ValueError, match="position embedding"):
        mmdit_params_from_diffusers({**state, "pos_embed.pos_embed": sd3_table.numpy()[None]}, TINY)


NAMES = tuple(mmdit.hook_names(TINY))


def test_capture_shapes_and_names(tiny):
    _, params = tiny
    inputs = _inputs(TINY)
    assert "blocks.1.hook_context_post" not in NAMES and "blocks.1.hook_context_attn_out" not in NAMES
    assert "blocks.0.hook_context_post" in NAMES and NAMES[0] == "hook_caption"
    out, cache = _forward(TINY, params, inputs, NAMES)
    assert set(cache) == set(NAMES)
    n, lt, d, heads, dh = TINY.num_patches, 5, TINY.hidden_size, TINY.num_heads, TINY.head_dim
    joint = lt + n
    stream = {"hook_resid_pre": n, "hook_resid_post": n, "hook_attn_out": n}
    for name, value in cache.items():
        hook = name.split(".")[-1]
        if hook == "hook_pattern":
            assert value.shape == (2, heads, joint, joint), name
        elif ".attn." in name:
            assert value.shape == (2, joint, heads, dh), name
        else:
            assert value.shape == (2, stream.get(hook, lt), d), name
    np.testing.assert_array_equal(cache["hook_caption"], cache["blocks.0.hook_context_pre"])
    np.testing.assert_array_equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    np.testing.assert_array_equal(cache["blocks.0.hook_context_post"], cache["blocks.1.hook_context_pre"])
    np.testing.assert_allclose(out, _forward(TINY, params, inputs)[0], rtol=1e-6, atol=1e-6)  # capture changes nothing
    with pytest.raises(ValueError, match="Unknown hook names"):
        mmdit.run_with_cache(mmdit.MMDiT(TINY), params, *inputs, ["blocks.1.hook_context_post"])


def test_neutral_interventions_are_bit_identical_and_mean_ablation_is_per_stream(tiny):
    _, params = tiny
    inputs = _inputs(TINY)
    base, clean = _forward(TINY, params, inputs, NAMES)
    ones = jnp.ones((TINY.depth, TINY.num_heads))
    every = dict(
        self_head_mask=ones,
        self_head_mean_mask=ones,
        self_head_patch=ones,
        resid_patch=jnp.ones(TINY.depth),
        patch_source=jnp.arange(2),  # each row its own source
    )
    np.testing.assert_array_equal(_forward(TINY, params, inputs, NAMES, **every)[0], base)
    # mean-ablating block 0's head 1: at each joint position the mean over the batch, a text position over the rows
    # where that caption token is valid (0 where none is); the other head is untouched
    out, ablated = _forward(TINY, params, inputs, NAMES, **{**every, "self_head_mean_mask": ones.at[0, 1].set(0.0)})
    z, ablated_z, valid = clean["blocks.0.attn.hook_z"], ablated["blocks.0.attn.hook_z"], np.asarray(inputs[3])
    weight = valid[:, :, None].astype(np.float64)
    text_mean = (np.asarray(z[:, :5, 1]) * weight).sum(0) / np.maximum(weight.sum(0), 1)
    np.testing.assert_allclose(ablated_z[:, :5, 1], np.broadcast_to(text_mean, (2, 5, 16)), atol=1e-6)
    np.testing.assert_allclose(ablated_z[:, 5:, 1], np.broadcast_to(z[:, 5:, 1].mean(0), (2, 16, 16)), atol=1e-6)
    np.testing.assert_array_equal(ablated_z[:, :, 0], z[:, :, 0])
    assert not np.allclose(out, base)
    # residual patches from the other row move the output inside their timestep window only (t = 3 and 731.5)
    plain, _ = _forward(TINY, params, inputs)
    swap = dict(resid_patch=jnp.ones(TINY.depth), patch_source=jnp.array([1, 0]))
    np.testing.assert_array_equal(
        _forward(TINY, params, inputs, **swap, patch_window=jnp.array([10.0, 20.0]))[0], plain
    )
    inside = _forward(TINY, params, inputs, **swap, patch_window=jnp.array([0.0, 10.0]))[0]
    np.testing.assert_array_equal(inside[1], plain[1])
    assert not np.allclose(inside[0], plain[0])


def test_zeroing_a_last_block_head_leaves_upstream_unchanged(tiny):
    _, params = tiny
    inputs = _inputs(TINY)
    out, cache = _forward(TINY, params, inputs, NAMES)
    head_mask = jnp.ones((TINY.depth, TINY.num_heads)).at[TINY.depth - 1, 1].set(0.0)
    ablated_out, ablated = _forward(TINY, params, inputs, NAMES, self_head_mask=head_mask)
    last = f"blocks.{TINY.depth - 1}"
    downstream = {f"{last}.attn.hook_z", f"{last}.hook_attn_out", f"{last}.hook_resid_post"}
    for name in NAMES:
        if name not in downstream:
            np.testing.assert_array_equal(ablated[name], cache[name], err_msg=name)
    z, ablated_z = cache[f"{last}.attn.hook_z"], ablated[f"{last}.attn.hook_z"]
    np.testing.assert_array_equal(ablated_z[:, :, 0], z[:, :, 0])
    assert np.all(ablated_z[:, :, 1] == 0) and np.any(z[:, :, 1] != 0)
    assert not np.allclose(ablated_out, out)


def test_padded_text_tokens_get_no_attention(tiny):
    _, params = tiny
    x, t, text, mask = _inputs(TINY)
    _, cache = _forward(TINY, params, (x, t, text, mask), NAMES)
    for name in (name for name in NAMES if name.endswith("hook_pattern")):
        pattern = cache[name]  # [B, heads, Lt+N, Lt+N]; joint keys 0..4 are the text tokens (text first)
        assert np.all(pattern[0][:, :, [2, 4]] == 0), name
        assert np.all(pattern[0][:, :, [0, 1, 3]] > 0) and np.all(pattern[1] > 0), name
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    garbage = text.copy()
    garbage[0, [2, 4]] = 100.0
    np.testing.assert_array_equal(
        _forward(TINY, params, (x, t, garbage, mask))[0], _forward(TINY, params, (x, t, text, mask))[0]
    )


def test_null_caption_rows(tiny):
    _, params = tiny
    x, t, text, mask = _inputs(TINY)
    null_text, null_mask = mmdit.null_caption(params, 2)
    dropped, _ = _forward(TINY, params, (x, t, text, mask), null_caption_rows=jnp.array([True, False]))
    explicit, _ = _forward(TINY, params, (x, t, null_text, null_mask))
    np.testing.assert_allclose(dropped[0], explicit[0], atol=1e-6)
    np.testing.assert_allclose(dropped[1], _forward(TINY, params, (x, t, text, mask))[0][1], atol=1e-6)


def test_bfloat16_forward_is_close(tiny):
    _, params = tiny
    inputs = _inputs(TINY)
    half, _ = _forward(dataclasses.replace(TINY, dtype="bfloat16"), params, inputs)
    assert half.dtype == np.float32
    assert _relative_error(half, _forward(TINY, params, inputs)[0]) < 0.05


def test_logical_axes_and_zero_init():
    specs = arch.logical_specs(TINY)
    shapes = nn.unbox(jax.eval_shape(lambda: mmdit.MMDiT(TINY).init(jax.random.key(0), *mmdit.example_inputs(TINY))))
    flat_specs, flat_shapes = traverse_util.flatten_dict(specs), traverse_util.flatten_dict(shapes["params"])
    assert set(flat_specs) == set(flat_shapes)
    for path, spec in flat_specs.items():
        assert len(spec) == len(flat_shapes[path].shape), path
        assert all(name is None or name in axes.LOGICAL_AXES for name in spec), (path, spec)
    assert flat_specs[("transformer_blocks_0", "norm1_context", "linear", "kernel")] == P(axes.EMBED, axes.ADALN)
    assert flat_specs[("transformer_blocks_0", "attn", "to_add_out", "kernel")] == P(axes.HEADS, axes.EMBED)
    assert flat_specs[("transformer_blocks_0", "attn", "norm_added_k", "scale")] == P(None)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), axes.MESH_AXES)
    shardings = rules.param_shardings(shapes["params"], specs, mesh)
    assert shardings["transformer_blocks_0"]["ff_context"]["net_0"]["proj"]["kernel"].spec == P(axes.FSDP, axes.MODEL)
    # adaLN-Zero: the modulation linears start at zero (every block starts as the identity)
    temb = jnp.ones((2, TINY.hidden_size))
    modulation = mmdit.AdaLNModulation(TINY.hidden_size, 6, jnp.float32)
    chunks = modulation.apply(modulation.init(jax.random.key(0), temb), temb)
    assert len(chunks) == 6 and all(chunk.shape == (2, 1, TINY.hidden_size) and not np.any(chunk) for chunk in chunks)


def test_parameter_matched_sizes():
    """The closed-form count equals the module's, and each PixArt size has an MM-DiT within 10 %."""
    for config in (
        TINY,
        CONFIGS["pixel_64_p8"],
    ):
        assert mmdit.mmdit_parameter_count(config) == mmdit.parameter_count(config)
    print("caption  size   PixArt (D,depth,heads) params  ->  MM-DiT (D,depth,heads) params  ratio")
    for caption_channels in (4096, 384):
        for size in ("nano", "micro", "mini"):
            hidden, depth, heads = dit.DIT_SIZES[size]
            pixart = mmdit.parameter_count(
                dit.DiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, caption_channels=caption_channels)
            )
            config = mmdit.mmdit_config(size, caption_channels=caption_channels)
            assert (config.depth, config.num_heads) == (depth, heads)
            count = mmdit.mmdit_parameter_count(config)
            ratio = count / pixart
            print(
                f"{caption_channels:5d}  {size:5s}  {(hidden, depth, heads)}  {pixart:,}  ->  "
                f"{(config.hidden_size, config.depth, config.num_heads)}  {count:,}  {ratio:.3f}"
            )
            assert abs(ratio - 1) < 0.10
    assert mmdit.mmdit_config("micro").hidden_size == 132
    assert mmdit.mmdit_config("micro", hidden_size=64, num_heads=2).hidden_size == 64
