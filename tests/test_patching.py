"""Activation patching: patch weights in the DiT (identity when a row is its own source, only the patched head moves,
the step window gates), corruptions and config layout, the two-world screen (clean -> clean is the identity, 8
devices = 1), the transfer score, and one planted circuit that synopsis, qk_screen, ablation and patching all find."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import TINY, noisy

from relcirc_jax import diffusion
from relcirc_jax.analysis import context, interventions, patching, qk_screen, synopsis
from relcirc_jax.config import base_config
from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.models import arch
from relcirc_jax.models.dit import DiT, init_params, run_with_cache, sincos_2d_position_embedding
from relcirc_jax.train import sampling
from relcirc_jax.train import state as train_state

# ---------------------------------------------------------------- the patch weights in the model


@pytest.fixture(scope="module")
def tiny():
    params = noisy(init_params(TINY, jax.random.key(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    t = jnp.full((4,), 400.0)
    text = jnp.asarray(rng.normal(size=(4, 5, 16)), jnp.float32)
    mask = jnp.ones((4, 5), bool)
    return params, (x, t, text, mask)


def _forward(tiny, names=(), **kwargs):
    params, inputs = tiny
    return jax.jit(lambda p, i, k: run_with_cache(DiT(TINY), p, *i, list(names), **k))(params, inputs, kwargs)


ONES_HEADS = jnp.ones((TINY.depth, TINY.num_heads))
SWAP = jnp.array([2, 3, 0, 1], jnp.int32)  # rows 0, 1 read rows 2, 3 and the other way round


def test_a_row_that_is_its_own_source_is_bit_identical(tiny):
    reference, _ = _forward(tiny)
    own = jnp.arange(4, dtype=jnp.int32)
    every = dict(self_head_patch=ONES_HEADS, cross_head_patch=ONES_HEADS, resid_patch=jnp.ones(TINY.depth))
    np.testing.assert_array_equal(_forward(tiny, patch_source=own, **every)[0], reference)


def test_patching_one_head_copies_its_output_and_leaves_upstream_unchanged(tiny):
    names = ["blocks.1.cross_attn.hook_z", "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post"]
    _, clean = _forward(tiny, names)
    weights = jnp.zeros((TINY.depth, TINY.num_heads)).at[1, 0].set(1.0)
    out, patched = _forward(tiny, names, cross_head_patch=weights, patch_source=SWAP)
    for name in names[1:]:
        np.testing.assert_array_equal(patched[name], clean[name])
    z, z_clean = np.asarray(patched[names[0]]), np.asarray(clean[names[0]])
    np.testing.assert_array_equal(z[:, :, 1], z_clean[:, :, 1])  # the other head of the layer
    np.testing.assert_allclose(z[:, :, 0], z_clean[np.asarray(SWAP), :, 0], rtol=1e-6, atol=1e-6)


def test_patching_the_first_residual_stream_is_patching_the_input_tokens(tiny):
    """Block 0's residual input is the patch embedding of x: patching it equals sampling the source row's x with the
    row's own caption."""
    params, (x, t, text, mask) = tiny
    out, _ = _forward(tiny, resid_patch=jnp.zeros(TINY.depth).at[0].set(1.0), patch_source=SWAP)
    want, _ = _forward((params, (x[np.asarray(SWAP)], t, text, mask)))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_the_step_window_gates_the_patch(tiny):
    reference, _ = _forward(tiny)
    weights = jnp.zeros((TINY.depth, TINY.num_heads)).at[1, 0].set(1.0)
    for window in ([500.0, 900.0], [100.0, 300.0]):  # the timestep 400 lies above the one, below the other
        outside = _forward(tiny, cross_head_patch=weights, patch_source=SWAP, patch_window=jnp.array(window))[0]
        np.testing.assert_array_equal(outside, reference)
    inside = _forward(tiny, cross_head_patch=weights, patch_source=SWAP, patch_window=jnp.array([400.0, 400.0]))[0]
    assert not np.array_equal(inside, reference)


def test_patch_weights_need_a_source(tiny):
    with pytest.raises(ValueError, match="without patch_source"):
        _forward(tiny, resid_patch=jnp.ones(TINY.depth))
    with pytest.raises(ValueError, match="patch_source has shape"):
        _forward(tiny, resid_patch=jnp.ones(TINY.depth), patch_source=jnp.arange(3))


# ---------------------------------------------------------------- corruptions, windows, configs, transfer


def test_corruptions_keep_template_and_phrasing():
    assert patching.corrupt("red circle is above the blue square", "relation") == "red circle is below the blue square"
    assert patching.corrupt("circle to the upper left of square", "relation") == "circle to the lower right of square"
    assert patching.corrupt("red circle is left of blue square", "shapes") == "red square is left of blue circle"
    with pytest.raises(ValueError, match="two circles"):
        patching.corrupt("red circle is above blue circle", "shapes")
    with pytest.raises(ValueError, match="Unknown corruption"):
        patching.corrupt("red circle is above blue square", "colours")


def test_windows_and_configs():
    assert patching.step_windows(14, 2) == [(0, 13), (0, 6), (7, 13)]
    assert patching.step_windows(14, 1) == [(0, 13)]
    timesteps = diffusion.model_timesteps("dpmpp_2m", 14)
    configs, labels = patching.patch_configs(2, 3, patching.step_windows(14, 2), timesteps)
    assert len(labels) == 3 * (2 * 2 * 3 + 2) and configs["resid_patch"].shape == (1 + len(labels), 2)
    for array in ("self_head_patch", "cross_head_patch", "resid_patch"):
        assert not configs[array][0].any()  # row 0 patches nothing
    row = 1 + labels.index(("cross", 1, 2, 2))  # cross-attention L1 H2 in the late window
    assert configs["cross_head_patch"][row].sum() == 1 and configs["cross_head_patch"][row, 1, 2] == 1
    assert not configs["self_head_patch"][row].any() and not configs["resid_patch"][row].any()
    np.testing.assert_array_equal(configs["patch_window"][row], (timesteps[13], timesteps[7]))
    inside = (timesteps >= configs["patch_window"][row, 0]) & (timesteps <= configs["patch_window"][row, 1])
    np.testing.assert_array_equal(np.flatnonzero(inside), np.arange(7, 14))
    # an MM-DiT's joint heads patch through its self-attention keyword; it has no cross-attention
    configs, labels = patching.patch_configs(2, 3, [(0, 13)], timesteps, ("joint", "resid"))
    assert sorted(configs) == ["patch_window", "resid_patch", "self_head_patch"] and len(labels) == 2 * 3 + 2
    assert configs["self_head_patch"][1 + labels.index(("joint", 1, 2, 0)), 1, 2] == 1


def test_transfer_is_the_share_of_the_change():
    rng = np.random.default_rng(0)
    clean, corrupted = rng.uniform(0, 255, (2, 5, 4, 4, 3))
    patched = np.stack([clean, corrupted, (clean + corrupted) / 2])
    captions = list("abcde")
    out = patching.transfer(patched, clean, corrupted, captions)
    np.testing.assert_allclose(out["transfer"], [0.0, 1.0, 0.5], atol=1e-12)
    assert np.all(out["ci_low"] <= out["transfer"] + 1e-12) and np.all(out["transfer"] <= out["ci_high"] + 1e-12)
    assert np.isnan(patching.transfer(patched, clean, clean, captions)["transfer"]).all()  # no effect to transfer


def test_transfer_intervals_resample_whole_prompts():
    """Every pair of a prompt agrees, so the interval is a bootstrap over prompts (a numpy reference here), twice as
    wide as the i.i.d. bootstrap over its 4 pairs."""
    prompts, per_prompt = 40, 4
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 255, (prompts, 8))
    change = rng.normal(size=(prompts, 8)) * rng.uniform(1, 3, (prompts, 1))
    share = rng.uniform(0, 1, (prompts, 1))  # of the change that the patch reproduces
    patched = np.stack([clean, clean + share * change])
    pairs = [np.repeat(a, per_prompt, axis=-2) for a in (patched, clean, clean + change)]
    captions = [f"prompt {p}" for p in range(prompts) for _ in range(per_prompt)]
    numerator, denominator = (share[:, 0] * (change**2).sum(1)), (change**2).sum(1)
    picks = np.random.default_rng(1).integers(0, prompts, (20000, prompts))
    reference = np.percentile(numerator[picks].sum(1) / denominator[picks].sum(1), [2.5, 97.5])
    out = patching.transfer(*pairs, captions)
    np.testing.assert_allclose([out["ci_low"][1], out["ci_high"][1]], reference, atol=0.1 * np.ptp(reference))
    iid = patching.transfer(*pairs, [str(i) for i in range(len(captions))])
    assert iid["ci_high"][1] - iid["ci_low"][1] < 0.6 * np.ptp(reference)


# ---------------------------------------------------------------- the screen on a smoke model


def _smoke_model(tmp_path, devices=None, model_arch="pixart"):
    config = base_config("rte", "micro", "smoke", arch=model_arch)  # depth 2, heads 2, text dim 32, 2 solver steps
    abstract = train_state.model_config(config, caption_channels=config.text.dim)
    params = noisy(arch.init_params(abstract, jax.random.key(0)))
    return context.from_params(config, params, tmp_path, "smoke", devices)


CLEAN = ["red circle is above blue square", "blue triangle is to the left of red circle", "red square is below circle"]


@pytest.mark.parametrize("model_arch", arch.ARCHS)
def test_clean_to_clean_patching_is_the_identity(tmp_path, model_arch):
    model = _smoke_model(tmp_path, model_arch=model_arch)
    windows = patching.step_windows(model.config.eval.num_steps, 2)
    timesteps = diffusion.model_timesteps("dpmpp_2m", 2)
    configs, _ = patching.patch_configs(2, 2, windows, timesteps, patching.model_sites(model.model_cfg))
    patched, twin, _ = patching.screen(model, CLEAN, CLEAN, configs, chunk=8)
    plain = sampling.eval_sampler(model.config, model.model_cfg, model.conditioner, model.mesh, model.param_sh, 3)
    # The screen samples 6 rows per call, the plain sampler 3: on an AVX-512 Xeon the CPU's kernels then sum in
    # another order (one pixel of 36,864 one level off; bit-equal on the AVX2 machines), so allow the odd level.
    reference = plain(model.params, model.tables, CLEAN).astype(int)
    for images in (*patched, twin):  # every config of the 6-row batch, and the twin world, is the clean sample
        assert np.abs(images.astype(int) - reference).max() <= 1 and (images != reference).mean() < 1e-3


def test_an_mmdit_patching_run_reports_its_joint_heads(tmp_path):
    model = _smoke_model(tmp_path, jax.devices()[:1], model_arch="mmdit")
    directory = patching.run(model, tmp_path, num_prompts=2, num_windows=1)
    with np.load(directory / "patching.npz") as arrays:
        assert arrays["transfer_joint"].shape == (1, 2, 2) and "transfer_self" not in arrays
        summary = patching.summary(dict(arrays), "smoke", sampling.describe_eval_sampler(model.config), "relation", 1)
    assert "4 joint-attention heads, and 2 residual streams" in summary
    timesteps = diffusion.model_timesteps("dpmpp_2m", 2)  # the window's solver steps named with their timesteps
    assert f"(steps 0-1 = t {timesteps.max():.0f}-{timesteps.min():.0f})" in summary
    assert summary == (directory / "summary.md").read_text() and (directory / "transfer_maps.png").exists()


def test_patching_screen_on_8_devices_equals_1(tmp_path):
    corrupted = [patching.corrupt(c, "relation") for c in CLEAN]
    configs, _ = patching.patch_configs(2, 2, [(0, 1)], diffusion.model_timesteps("dpmpp_2m", 2))
    eight = patching.screen(_smoke_model(tmp_path), CLEAN, corrupted, configs, chunk=12)
    one = patching.screen(_smoke_model(tmp_path, jax.devices()[:1]), CLEAN, corrupted, configs, chunk=12)
    for a, b in zip(eight[:2], one[:2]):
        assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 1e-3


# ---------------------------------------------------------------- one planted circuit, found by every analysis

PLANTED = (1, 0)  # cross-attention layer 1, head 0
RANDOM = (1, 1)  # the head beside it, left random
ABOVE, BELOW = qk_screen.relation_captions()[:2]  # "red circle is above blue square", "... below ..."


def _planted_model(tmp_path):
    """A DiT whose only strong caption path is one cross-attention head: every image token's query (a constant plus
    its (column, row) from the position embedding) meets a key that is large on the relation-phrase tokens and carries
    the relation's reference gradient, so the head attends to the relation word with a position-dependent logit; its
    value on those tokens is the relation's direction (dx, dy), written into the residual stream. The caption
    projection passes the text embedding through unchanged (gelu(u) - gelu(-u) = u), so the keys and values can be
    solved exactly on the tokens of the 8 canonical relation captions. The other heads keep random weights."""
    config = base_config("rte", "micro", "smoke")
    config.model.hidden_size, config.text.dim = 384, 192
    cfg = train_state.model_config(config, caption_channels=config.text.dim)
    rng = np.random.default_rng(0)
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(0)))
    d, dc, dh = cfg.hidden_size, config.text.dim, cfg.head_dim
    projection = params["caption_projection"]
    projection["linear_1"]["kernel"][:] = np.concatenate([np.eye(dc), -np.eye(dc)], 1)
    projection["linear_2"]["kernel"][:] = np.concatenate([np.eye(dc, d), -np.eye(dc, d)], 0)
    for layer in projection.values():
        layer["bias"][:] = 0.0
    params["proj_out"]["kernel"][:] = 0.05 * rng.standard_normal(params["proj_out"]["kernel"].shape)
    for layer in range(cfg.depth):
        out = params[f"transformer_blocks_{layer}"]["attn2"]["to_out_0"]["kernel"]
        out[:] = 0.02 * rng.standard_normal(out.shape)

    model = context.from_params(config, params, tmp_path, "planted")
    captions = list(qk_screen.relation_captions())
    text, _ = model.conditioner.embed(model.tables, sampling.caption_batch(captions))
    tokens = np.asarray(text, np.float64).reshape(-1, dc)
    is_relation = (tokenizer.roles(captions) == prompts.ROLES.index("relation")).reshape(-1)
    per_caption = np.array([_gradient(r) for r in qk_screen.reference_maps(cfg.grid_size)])
    gradient = np.repeat(per_caption, text.shape[1], axis=0) * is_relation[:, None]
    keys, values = np.zeros((len(tokens), dh)), np.zeros((len(tokens), dh))
    keys[:, 0], keys[:, 1:3] = 40.0 * np.sqrt(dh) * is_relation, gradient
    values[:, :2] = gradient
    design = np.concatenate([tokens, np.ones((len(tokens), 1))], 1)
    positions = sincos_2d_position_embedding(d, cfg.grid_size, cfg.pos_interpolation_scale).astype(np.float64)
    rows, cols = np.divmod(np.arange(cfg.grid_size**2), cfg.grid_size)
    queries = np.zeros((len(positions), dh))
    queries[:, 1], queries[:, 2] = cols, rows

    layer, head = PLANTED
    attn = params[f"transformer_blocks_{layer}"]["attn2"]
    columns = slice(head * dh, (head + 1) * dh)
    attn["to_q"]["kernel"][:, columns] = np.linalg.lstsq(positions, queries, rcond=None)[0]
    attn["to_q"]["bias"][columns] = np.eye(dh)[0]
    for name, target in (("to_k", keys), ("to_v", values)):
        solution = np.linalg.lstsq(design, target, rcond=None)[0]
        attn[name]["kernel"][:dc, columns], attn[name]["kernel"][dc:, columns] = solution[:-1], 0.0
        attn[name]["bias"][columns] = solution[-1]
    attn["to_out_0"]["kernel"][columns] = 0.0
    attn["to_out_0"]["kernel"][columns.start : columns.start + 2] = rng.standard_normal((2, d))
    return context.from_params(config, params, tmp_path, "planted")


def _gradient(reference_map: np.ndarray) -> tuple[float, float]:
    """(coefficient of column, coefficient of row) of a linear reference map."""
    return float(reference_map[0, 1] - reference_map[0, 0]), float(reference_map[1, 0] - reference_map[0, 0])


def test_a_planted_circuit_is_found_by_every_analysis(tmp_path):
    model = _planted_model(tmp_path)
    cfg = model.model_cfg

    # qk_screen: the planted head's logit maps follow every relation's gradient
    qk = qk_screen.screen(model.params, cfg, model.conditioner, model.tables)
    assert tuple(qk["ranking"][0]) == PLANTED and qk["head_score"][PLANTED] > 0.99
    assert qk["head_score"][RANDOM] < 0.8

    # synopsis: object tokens of the planted head attend to the relation word
    n = cfg.grid_size**2
    token_groups = np.zeros((2, n, 3), np.float32)
    token_groups[:, : n // 2, 0], token_groups[:, n // 2 :, 1] = 1, 1
    arrays = synopsis.synopsis(model, [ABOVE, BELOW], token_groups)
    assert tuple(synopsis.ranking(arrays["relation_score"])[0]) == PLANTED
    assert arrays["relation_score"][PLANTED] > 0.99 and arrays["relation_score"][RANDOM] < 0.5

    # ablation: the above/below difference of the samples (same noise) is gone without the planted head
    masks = np.ones((3, cfg.depth, cfg.num_heads), np.float32)
    masks[1][PLANTED], masks[2][RANDOM] = 0.0, 0.0
    images, _ = interventions.screen(model, [ABOVE, BELOW], {"cross_head_mask": masks}, noise_id=np.zeros(2, np.int32))
    signal = np.abs(images[:, 0].astype(float) - images[:, 1]).mean((1, 2, 3))
    assert signal[0] > 5 and signal[1] < 0.1 * signal[0] and signal[2] > 0.7 * signal[0], signal

    # patching: the planted head alone carries "below" into the "above" sample; the random head does not
    timesteps = diffusion.model_timesteps(model.config.eval.solver, model.config.eval.num_steps)
    configs, labels = patching.patch_configs(cfg.depth, cfg.num_heads, [(0, len(timesteps) - 1)], timesteps)
    patched, twin, _ = patching.screen(model, [ABOVE], [BELOW], configs)
    transfer = patching.transfer(patched, patched[0], twin, [ABOVE])["transfer"]
    cross = {(layer, head): transfer[1 + labels.index(("cross", layer, head, 0))] for layer, head in (PLANTED, RANDOM)}
    assert cross[PLANTED] > 0.9 and abs(cross[RANDOM]) < 0.1, cross
    assert labels[np.argmax(transfer[1:])] == ("cross", *PLANTED, 0), transfer
    others = [transfer[1 + i] for i, site in enumerate(labels) if site[0] != "resid" and site != ("cross", *PLANTED, 0)]
    assert max(np.abs(others)) < 0.5, transfer
