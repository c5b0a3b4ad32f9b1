"""Contextual-space repulsion (analysis/repulsion.py): the tests of shared/papers/contextual_repulsion_notes.md 6.4,
on the entropy step itself and inside the sampler of a tiny random MM-DiT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import noisy

from relcirc_jax.analysis import diversity, groups, repulsion
from relcirc_jax.models import arch, dit, mmdit
from relcirc_jax.parallel import make_mesh
from relcirc_jax.text import conditioner
from relcirc_jax.train import sampling

CFG = repulsion.RepulsionConfig(inner_steps=10, group_size=4)


def _tokens(seed=0, groups=2, spread=1.0, shape=(4, 5, 8)):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((groups, 1) + shape[1:]).astype(np.float32)
    return jnp.asarray((base + spread * rng.standard_normal((groups,) + shape)).reshape((-1,) + shape[1:]))


def _entropy_by_eigvalsh(vectors, reg):
    unit = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    n = vectors.shape[0]
    lam = jnp.linalg.eigvalsh((unit @ unit.T + reg * jnp.eye(n)) / (n * (1 + reg)))
    return -jnp.sum(lam * jnp.log(lam))


def test_custom_vjp_gradient_equals_autodiff_through_eigvalsh():
    vectors = _tokens(spread=1.0)[:4].reshape(4, -1)
    ours = jax.grad(lambda c: repulsion.group_entropy(c, CFG))(vectors)
    autodiff = jax.grad(lambda c: _entropy_by_eigvalsh(c, CFG.kernel_reg))(vectors)
    np.testing.assert_allclose(ours, autodiff, rtol=1e-3, atol=1e-6 * float(jnp.abs(autodiff).max()))
    assert float(jnp.abs(ours).max()) > 0


def test_identical_samples_get_exactly_zero_update():
    """The PixArt degeneracy (notes 6.1): a group of identical contextual vectors has zero entropy gradient. Up to
    eta 1 (the sweep's largest, ~25 degrees of rotation for spread-out vectors) the float32 residue of eigh (~1e-8)
    is absorbed exactly; far beyond, the unstable equilibrium amplifies it."""
    same = jnp.broadcast_to(_tokens()[:1], (4, 5, 8))
    for eta in (0.1, 1.0):
        moved = repulsion.repel_group(same, jnp.ones((4, 5), bool), eta, CFG)
        np.testing.assert_array_equal(moved, same)


def test_angular_step_is_scale_equivariant_and_raw_is_not():
    x, mask = _tokens()[:4], jnp.ones((4, 5), bool)
    for scale in (0.1, 10.0):
        np.testing.assert_allclose(
            repulsion.repel_group(scale * x, mask, 0.3, CFG), scale * repulsion.repel_group(x, mask, 0.3, CFG),
            rtol=1e-4, atol=1e-5 * scale,
        )  # fmt: skip
    raw = dataclasses.replace(CFG, eta_mode="raw")
    delta = lambda s: repulsion.repel_group(s * x, mask, 0.3, raw) - s * x
    assert float(jnp.abs(delta(10.0)).max()) < 0.5 * float(jnp.abs(delta(1.0)).max())  # raw |grad| ~ 1/|c|


def test_entropy_rises_monotonically_with_eta():
    x, mask = _tokens(spread=0.1)[:4], jnp.ones((4, 5), bool)
    vendi = [
        float(diversity.vendi_score(repulsion.repel_group(x, mask, eta, CFG).reshape(4, -1)))
        for eta in (0.0, 0.05, 0.2, 0.5)
    ]
    assert all(a < b for a, b in zip(vendi, vendi[1:])), vendi


def test_groups_are_isolated_and_masked_tokens_stay():
    x = _tokens(groups=4)  # [cond: 2 groups; uncond: 2 groups]
    mask = jnp.ones(x.shape[:2], bool).at[:, -2:].set(False)
    on = jnp.ones(x.shape[0], bool)
    out = repulsion.repel_groups(x, mask, on, 0.5, CFG)
    np.testing.assert_array_equal(out[:, -2:], x[:, -2:])
    assert float(jnp.abs(out - x).max()) > 1e-3
    perturbed = x.at[4:8].add(1.0)  # group 1 only
    out2 = repulsion.repel_groups(perturbed, mask, on, 0.5, CFG)
    np.testing.assert_array_equal(out2[:4], out[:4])
    np.testing.assert_array_equal(out2[8:], out[8:])
    off = on.at[8].set(False)  # a group with one row off is left alone
    np.testing.assert_array_equal(repulsion.repel_groups(x, mask, off, 0.5, CFG)[8:12], x[8:12])


def test_branch_selection_moves_only_the_chosen_half():
    x = _tokens(groups=4)  # [cond: 2 groups; uncond: 2 groups]
    rows = repulsion.rows_on(dataclasses.replace(CFG, branches="cond"), 8)
    rep = repulsion.Repulsion(CFG, jnp.float32(0.5), jnp.array([0.0, 1e4]), jnp.ones(2), rows)
    out = rep.apply(x, 0, "block_out", "text", jnp.full((16,), 500.0))
    np.testing.assert_array_equal(out[8:], x[8:])
    assert float(jnp.abs(out[:8] - x[:8]).max()) > 1e-3
    assert rep.apply(x, 0, "attn_out", "text", jnp.full((16,), 500.0)) is x  # another site: untouched
    np.testing.assert_array_equal(rep.apply(x, 0, "block_out", "text", jnp.full((16,), 2e4)), x)  # outside window


def _moved_tokens(before, after):
    return np.asarray(jnp.abs(after - before).max(-1) > 0)


def test_token_masks_move_only_their_tokens_and_the_negative_caption_counts_as_padding():
    x = _tokens(groups=2, shape=(4, 8, 6))  # [cond: 1 group; uncond: 1 group], 8 caption tokens
    text_mask = jnp.ones((8, 8), bool).at[:, 6:].set(False)
    role = {name: groups.TEXT_ROLES.index(name) for name in groups.TEXT_ROLES}
    caption = [role[r] for r in ("color1", "shape1", "relation", "relation", "color2", "shape2", "pad", "pad")]
    roles = jnp.asarray([caption] * 4, jnp.int32)
    t = jnp.full((8,), 500.0)
    expected = {  # per token: cond rows, uncond rows (the empty caption: no object or relation words)
        "valid": ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]),
        "all": ([1] * 8, [1] * 8),
        "padding": ([0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]),
        "no_relation": ([1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]),
        "objects": ([1, 1, 0, 0, 1, 1, 0, 0], [0] * 8),
    }
    for mask, (cond, uncond) in expected.items():
        config = dataclasses.replace(CFG, token_mask=mask)
        rep = repulsion.Repulsion(
            config, jnp.float32(0.5), jnp.array([0.0, 1e4]), jnp.ones(2), jnp.ones(8, bool),
            repulsion.cfg_roles(config, roles),
        )  # fmt: skip
        moved = _moved_tokens(x, rep.apply(x, 0, "block_out", "text", t, text_mask))
        assert moved[:4].tolist() == [[bool(v) for v in cond]] * 4, mask
        assert moved[4:].tolist() == [[bool(v) for v in uncond]] * 4, mask
    no_roles = repulsion.Repulsion(dataclasses.replace(CFG, token_mask="objects"), *rep[1:5])
    with pytest.raises(ValueError, match="selects caption tokens by role"):
        no_roles.apply(x, 0, "block_out", "text", t, text_mask)


def test_the_both_target_repels_each_stream_as_its_own_target_does():
    x = _tokens(groups=2)
    t, text_mask = jnp.full((8,), 500.0), jnp.ones(x.shape[:2], bool)
    knobs = (jnp.float32(0.5), jnp.array([0.0, 1e4]), jnp.ones(2), jnp.ones(8, bool))
    both = repulsion.Repulsion(dataclasses.replace(CFG, target="both"), *knobs)
    for stream in ("text", "image"):
        alone = repulsion.Repulsion(dataclasses.replace(CFG, target=stream), *knobs)
        np.testing.assert_array_equal(
            both.apply(x, 0, "block_out", stream, t, text_mask), alone.apply(x, 0, "block_out", stream, t, text_mask)
        )
        assert float(jnp.abs(alone.apply(x, 0, "block_out", stream, t, text_mask) - x).max()) > 1e-3
    text_only = repulsion.Repulsion(CFG, *knobs)
    assert text_only.apply(x, 0, "block_out", "image", t, text_mask) is x


def test_a_vmapped_screen_keeps_the_skip_and_equals_each_setting_alone():
    """Under vmap over knob settings a per-setting predicate would turn the lax.cond into a select that runs the
    repulsion always; reduced over the settings axis it stays a cond, and each setting's result is unchanged."""
    x, mask, on = _tokens(), jnp.ones((8, 5), bool), jnp.ones(8, bool)
    etas = jnp.array([0.0, 0.2, 0.5])
    named = dataclasses.replace(CFG, settings_axis="settings")

    def screen(config):
        return jax.vmap(lambda eta: repulsion.repel_groups(x, mask, on & (eta > 0), eta, config), axis_name="settings")

    for eta, out in zip(etas, screen(named)(etas)):
        np.testing.assert_allclose(out, repulsion.repel_groups(x, mask, on & (eta > 0), eta, CFG), rtol=1e-6, atol=1e-6)
    primitives = lambda config: {e.primitive.name for e in jax.make_jaxpr(screen(config))(etas).jaxpr.eqns}  # noqa: E731
    assert "cond" in primitives(named)
    assert "cond" not in primitives(CFG)  # the trap the axis avoids: vmap lowered the cond to a select


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        repulsion.repel_groups(_tokens()[:6], jnp.ones((6, 5), bool), jnp.ones(6, bool), 0.5, CFG)
    with pytest.raises(ValueError, match="site='middle' is unknown"):
        repulsion.RepulsionConfig(site="middle")


def test_groups_are_checked_in_each_cfg_half():
    """12 rows split into groups of 4, but each CFG half of 6 does not: the middle group would repel prompt B's
    conditional rows against prompt A's unconditional ones (finding 4)."""
    x = _tokens(groups=3)
    with pytest.raises(ValueError, match="CFG half: its batch of 6 rows does not split into groups of 4"):
        repulsion.repel_groups(x, jnp.ones(x.shape[:2], bool), jnp.ones(12, bool), 0.5, CFG)
    with pytest.raises(ValueError, match="even number of rows; got 7"):
        repulsion.check_cfg_groups(7, 4)


def test_windows_and_thirds():
    window = repulsion.first_steps_window("dpmpp_2m", 14, 2)
    timesteps = sampling.diffusion.model_timesteps("dpmpp_2m", 14)
    assert window[1] == timesteps[0] and window[0] == timesteps[1]
    inside = (timesteps >= window[0]) & (timesteps <= window[1])
    assert inside.tolist() == [True, True] + [False] * 12
    assert not ((timesteps >= 0) & (timesteps <= repulsion.first_steps_window("dpmpp_2m", 14, 0)[0]) & False).any()
    thirds = repulsion.thirds(7)
    assert thirds["all"].tolist() == [1, 1, 1, 1, 1, 1, 0]  # the context_pre_only last block has no text output
    assert (thirds["first"] + thirds["middle"] + thirds["last"]).tolist() == thirds["all"].tolist()


def test_collapsed_thirds_are_named_once_and_image_thirds_span_every_block():
    """Depth 3 (the nano MM-DiT): 2 blocks with a text output, so "middle" would repeat "last"; the image stream's
    thirds cut all 3 blocks (finding 6)."""
    as_lists = lambda selections: {name: sel.tolist() for name, sel in selections.items()}  # noqa: E731
    assert as_lists(repulsion.thirds(3)) == {"all": [1, 1, 0], "first": [1, 0, 0], "last": [0, 1, 0]}
    image = {"all": [1, 1, 1], "first": [1, 0, 0], "middle": [0, 1, 0], "last": [0, 0, 1]}
    assert as_lists(repulsion.thirds(3, text=False)) == image
    assert as_lists(repulsion.thirds(2)) == {"all": [1, 0]}
    image = repulsion.thirds(7, text=False)
    assert image["all"].tolist() == [1] * 7 and image["last"].tolist() == [0, 0, 0, 0, 0, 1, 1]


# --- inside the sampler of a tiny MM-DiT


@pytest.fixture(scope="module")
def tiny_mmdit():
    text = conditioner.make_text_conditioner("rte", dim=16, position_scale=0.5)
    cfg = mmdit.MMDiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2, caption_channels=16)
    params = noisy(arch.init_params(cfg, jax.random.key(0)))
    captions = ["red square is above blue circle"] * 4 + ["blue triangle is to the left of red circle"] * 4
    batch = {k: jnp.asarray(v) for k, v in sampling.caption_batch(captions).items()}
    return cfg, text, params, batch


def _sampler(model_cfg, text, config=CFG, steps=4, group_size=4):
    generate = sampling.generate_fn(
        model_cfg, text, cfg_scale=3.0, num_steps=steps, solver="dpmpp_2m", seed=0, negative="empty_prompt",
        repulsion=config, group_size=group_size,
    )  # fmt: skip
    return jax.jit(generate)


def _knobs(eta, depth, tau=2, steps=4, blocks=None):
    window = repulsion.first_steps_window("dpmpp_2m", steps, tau)
    blocks = np.ones(depth) if blocks is None else blocks
    return {k: jnp.asarray(v) for k, v in repulsion.knobs(eta, window, blocks).items()}


def test_eta_zero_is_bit_identical_to_the_base_sampler_and_knobs_do_not_recompile(tiny_mmdit):
    cfg, text, params, batch = tiny_mmdit
    noise_id = jnp.arange(8)
    base = jax.jit(
        sampling.generate_fn(cfg, text, cfg_scale=3.0, num_steps=4, solver="dpmpp_2m", seed=0, negative="empty_prompt")
    )(params, batch, text.tables, noise_id)
    generate = _sampler(cfg, text)
    off = generate(params, batch, text.tables, noise_id, _knobs(0.0, cfg.depth))
    np.testing.assert_array_equal(off, base)
    on = generate(params, batch, text.tables, noise_id, _knobs(2.0, cfg.depth))
    assert np.abs(np.asarray(on, np.int32) - np.asarray(base, np.int32)).max() > 0
    last_only = generate(params, batch, text.tables, noise_id, _knobs(2.0, cfg.depth, blocks=np.eye(cfg.depth)[-1]))
    np.testing.assert_array_equal(last_only, base)  # the context_pre_only block has no text output to repel
    generate(params, batch, text.tables, noise_id, _knobs(0.5, cfg.depth, tau=1, blocks=np.eye(cfg.depth)[0]))
    assert generate._cache_size() == 1


def test_the_sampler_refuses_groups_that_straddle_prompts_or_cfg_halves(tiny_mmdit):
    """6 captions in groups of 4 (finding 4): generate_fn refuses the batch, and so does a Sampler whose chunk or
    captions do not split into one-prompt groups, each naming the fix."""
    cfg, text, params, batch = tiny_mmdit
    six = {k: v[2:] for k, v in batch.items()}
    with pytest.raises(ValueError, match="batch of 6 rows does not split into groups of 4.*straddle.*Fix"):
        _sampler(cfg, text)(params, six, text.tables, jnp.arange(6), _knobs(2.0, cfg.depth))
    settings = dict(cfg_scale=3.0, num_steps=2, solver="dpmpp_2m", seed=0)
    repel = dict(generate_kwargs=dict(repulsion=CFG, group_size=4))
    with pytest.raises(ValueError, match="Sampler.batch_size=6. .* Fix: make batch_size a multiple of 4"):
        sampling.Sampler(cfg, text, make_mesh({"data": 2}, jax.devices()[:2]), None, batch_size=6, **settings, **repel)
    sampler = sampling.Sampler(cfg, text, make_mesh({"data": 2}, jax.devices()[:2]), None, batch_size=8, **settings)
    assert sampler.batch_size == 8  # no repulsion: no group check
    sampler = sampling.Sampler(
        cfg, text, make_mesh({"data": 2}, jax.devices()[:2]), None, batch_size=8, **settings, **repel
    )
    captions = ["red square is above blue circle"] * 2 + ["blue triangle is to the left of red circle"] * 6
    with pytest.raises(ValueError, match="Captions 0..3 form one repulsion group but name 2 prompts"):
        sampler(params, text.tables, captions)


def test_the_samplers_group_size_is_the_repulsions(tiny_mmdit):
    cfg, text, params, batch = tiny_mmdit
    noise_id, knobs = jnp.arange(8), _knobs(2.0, cfg.depth)
    fours = _sampler(cfg, text)(params, batch, text.tables, noise_id, knobs)  # config and sampler: groups of 4
    config_says_8 = _sampler(cfg, text, dataclasses.replace(CFG, group_size=8))(
        params, batch, text.tables, noise_id, knobs
    )
    np.testing.assert_array_equal(config_says_8, fours)
    sampler_says_8 = _sampler(cfg, text, group_size=8)(params, batch, text.tables, noise_id, knobs)
    assert not np.array_equal(sampler_says_8, fours)  # one group of 8 spans both prompts


def test_repulsion_spreads_the_text_stream_of_each_group(tiny_mmdit):
    cfg, text, params, batch = tiny_mmdit
    embedded, mask = text.embed(text.tables, batch)
    x, t = dit.example_inputs(cfg, 8)[:2]
    x = jax.random.normal(jax.random.key(1), x.shape) * 0.01  # near-identical images: a collapsed contextual space
    t = jnp.full((8,), 900.0)
    rep = repulsion.Repulsion(CFG, jnp.float32(1.0), jnp.array([0.0, 1e4]), jnp.ones(cfg.depth), jnp.ones(8, bool))
    name = "blocks.1.hook_context_pre"  # the stream block 0 left (after the repulsion)
    plain = arch.run_with_cache(cfg, params, x, t, embedded, mask, [name])[1][name]
    moved = arch.run_with_cache(cfg, params, x, t, embedded, mask, [name], repulsion=rep)[1][name]
    for g in range(2):
        flat = lambda a: (a[4 * g : 4 * g + 4] * mask[4 * g : 4 * g + 4, :, None]).reshape(4, -1)
        assert float(diversity.vendi_score(flat(moved))) > float(diversity.vendi_score(flat(plain))) + 0.05


def test_pixart_repels_its_image_tokens_or_its_pseudo_contextual_caption():
    text = conditioner.make_text_conditioner("rte", dim=16, position_scale=0.5)
    cfg = dit.DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, caption_channels=16)
    params = noisy(arch.init_params(cfg, jax.random.key(0)))
    captions = ["red square is above blue circle"] * 4
    batch = {k: jnp.asarray(v) for k, v in sampling.caption_batch(captions).items()}
    batch["roles"] = jnp.asarray(groups.token_roles(text, captions))
    with pytest.raises(ValueError, match="zero gradient"):
        _sampler(cfg, text)(params, batch, text.tables, jnp.arange(4), _knobs(1.0, cfg.depth))
    images = {}
    for target, token_mask in (("image", "valid"), ("pseudo_text", "valid"), ("pseudo_text", "no_relation")):
        generate = _sampler(cfg, text, dataclasses.replace(CFG, target=target, token_mask=token_mask))
        off = generate(params, batch, text.tables, jnp.arange(4), _knobs(0.0, cfg.depth))
        on = generate(params, batch, text.tables, jnp.arange(4), _knobs(2.0, cfg.depth))
        assert np.abs(np.asarray(on, np.int32) - np.asarray(off, np.int32)).max() > 0, target
        images[target, token_mask] = np.asarray(on)
    assert not np.array_equal(images["pseudo_text", "valid"], images["pseudo_text", "no_relation"])
