"""Head ablation: zero/mean head masks in the DiT, the vmapped screen (baseline = plain sampling, mesh-independent),
paired effects with bootstrap intervals, set-vs-random masks and the written report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_models import TINY, noisy

from relcirc_jax.analysis import ablation, context, interventions
from relcirc_jax.config import base_config
from relcirc_jax.data import scenes
from relcirc_jax.evaluation.scoring import METRICS
from relcirc_jax.models import arch
from relcirc_jax.models.dit import DiT, init_params, run_with_cache
from relcirc_jax.train import evaluate, sampling
from relcirc_jax.train import state as train_state

SPATIAL, OVERALL, COLOR = (METRICS.index(m) for m in ("spatial_relationship", "overall", "color"))


# ---------------------------------------------------------------- the masks in the model


@pytest.fixture(scope="module")
def tiny():
    params = noisy(init_params(TINY, jax.random.key(0)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
    t = jnp.array([5.0, 400.0, 900.0])
    text = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    return params, (x, t, text, mask)


def _cached(tiny, names, **masks):
    """(output, {name: activation}) of a jitted forward pass with the given head masks."""
    params, inputs = tiny
    if not names:
        return jax.jit(lambda p, i, m: DiT(TINY).apply({"params": p}, *i, **m))(params, inputs, masks), {}
    return jax.jit(lambda p, i, m: run_with_cache(DiT(TINY), p, *i, names, **m))(params, inputs, masks)


def test_all_ones_masks_are_bit_identical_to_no_mask(tiny):
    ones = jnp.ones((TINY.depth, TINY.num_heads))
    reference, _ = _cached(tiny, [])
    for key in ("self_head_mask", "cross_head_mask", "self_head_mean_mask", "cross_head_mean_mask"):
        np.testing.assert_array_equal(_cached(tiny, [], **{key: ones})[0], reference)
    every = dict.fromkeys(("self_head_mask", "cross_head_mask", "self_head_mean_mask", "cross_head_mean_mask"), ones)
    np.testing.assert_array_equal(_cached(tiny, [], **every)[0], reference)


def test_zeroing_a_last_layer_cross_head_leaves_upstream_exactly_unchanged(tiny):
    last = TINY.depth - 1
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(TINY.depth)] + [f"blocks.{last}.cross_attn.hook_z"]
    clean_out, clean = _cached(tiny, names)
    mask = jnp.ones((TINY.depth, TINY.num_heads)).at[last, 1].set(0.0)
    out, ablated = _cached(tiny, names, cross_head_mask=mask)
    assert not np.allclose(out, clean_out, atol=1e-4)
    for layer in range(last):
        name = f"blocks.{layer}.hook_resid_post"
        np.testing.assert_array_equal(ablated[name], clean[name])
    z, clean_z = ablated[f"blocks.{last}.cross_attn.hook_z"], clean[f"blocks.{last}.cross_attn.hook_z"]
    assert float(jnp.abs(clean_z[:, :, 1]).max()) > 0 and float(jnp.abs(z[:, :, 1]).max()) == 0.0
    np.testing.assert_array_equal(z[:, :, 0], clean_z[:, :, 0])
    assert not np.array_equal(ablated[f"blocks.{last}.hook_resid_post"], clean[f"blocks.{last}.hook_resid_post"])


@pytest.mark.parametrize("kind", ["attn", "cross_attn"])
def test_mean_ablation_replaces_z_by_its_mean_over_the_rows_of_its_group_at_each_position(tiny, kind):
    key = "self_head_mean_mask" if kind == "attn" else "cross_head_mean_mask"
    names = [f"blocks.0.{kind}.hook_z", "blocks.0.hook_resid_pre"]
    clean_out, clean = _cached(tiny, names)
    mean_mask = jnp.ones((TINY.depth, TINY.num_heads)).at[0, 0].set(0.0)
    out, ablated = _cached(tiny, names, **{key: mean_mask})
    np.testing.assert_array_equal(ablated["blocks.0.hook_resid_pre"], clean["blocks.0.hook_resid_pre"])
    clean_z, z = np.asarray(clean[names[0]]).astype(np.float64), np.asarray(ablated[names[0]])
    expected = clean_z[:, :, 0].mean(axis=0)  # [query_pos, head_dim]: one group, the mean over the batch
    np.testing.assert_allclose(z[:, :, 0], np.broadcast_to(expected, z[:, :, 0].shape), rtol=1e-6, atol=1e-6)
    assert np.ptp(clean_z[:, :, 0], axis=0).max() > 1e-3  # the clean z did vary: the mean is a real change
    np.testing.assert_array_equal(z[:, :, 1], clean_z[:, :, 1])
    # groups (the CFG halves): rows 0 and 2 share a mean; row 1 is padding, in no group, and reads 0
    _, grouped = _cached(tiny, names, **{key: mean_mask}, mean_group=jnp.array([0, -1, 0]))
    z = np.asarray(grouped[names[0]])
    expected = clean_z[[0, 2], :, 0].mean(axis=0)
    np.testing.assert_allclose(z[[0, 2], :, 0], np.broadcast_to(expected, (2,) + expected.shape), atol=1e-6)
    np.testing.assert_array_equal(z[1, :, 0], 0.0)
    _, alone = _cached(tiny, names, **{key: mean_mask}, mean_group=jnp.array([0, 1, 1]))
    np.testing.assert_allclose(np.asarray(alone[names[0]])[0, :, 0], clean_z[0, :, 0], atol=1e-6)  # its own group
    assert not np.allclose(out, clean_out, atol=1e-4)
    zero_out, _ = _cached(tiny, names, **{key.replace("_mean", ""): jnp.ones((3, 2)).at[0, 0].set(0.0)})
    assert not np.allclose(out, zero_out, atol=1e-4)  # mean ablation is not zero ablation


def test_mean_masks_are_validated(tiny):
    with pytest.raises(ValueError, match=r"cross_head_mean_mask has shape \(2, 2\); expected \[depth, heads\]"):
        _cached(tiny, [], cross_head_mean_mask=jnp.ones((2, 2)))


# ---------------------------------------------------------------- masks


def test_single_head_mask_layout():
    depth, heads = 3, 2
    masks = ablation.single_head_masks(depth, heads)
    labels = ablation.single_head_labels(depth, heads)
    assert masks.shape == (1 + 2 * depth * heads, 2, depth, heads) and len(labels) == len(masks) - 1
    assert masks[0].min() == 1.0
    for row, (kind, layer, head) in enumerate(labels, start=1):
        expected = np.ones((2, depth, heads), np.float32)
        expected[ablation.KINDS.index(kind), layer, head] = 0.0
        np.testing.assert_array_equal(masks[row], expected)
    assert labels[0] == ("self", 0, 0) and labels[depth * heads] == ("cross", 0, 0) and labels[-1] == ("cross", 2, 1)


def test_head_set_masks_draw_random_sets_of_the_same_kinds():
    chosen = [("cross", 1, 0), ("self", 2, 1), ("cross", 0, 1)]
    masks, sets = ablation.head_set_masks(3, 2, chosen, num_random=5, seed=1)
    assert masks.shape == (7, 2, 3, 2) and masks[0].min() == 1.0 and len(sets) == 6
    assert sorted(sets[0]) == sorted(chosen)
    for row, head_set in enumerate(sets, start=1):
        assert (masks[row] == 0).sum() == 3
        assert sorted(k for k, _, _ in head_set) == ["cross", "cross", "self"]
        assert all(masks[row, ablation.KINDS.index(k), layer, head] == 0 for k, layer, head in head_set)
        if row > 1:
            assert not set(head_set) & set(chosen)  # enough other heads remain
    assert ablation.head_set_masks(3, 2, chosen, num_random=5, seed=1)[1] == sets
    with pytest.raises(ValueError, match="outside"):
        ablation.head_set_masks(3, 2, [("self", 3, 0)])
    with pytest.raises(ValueError, match="Unknown head kind"):
        ablation.head_set_masks(3, 2, [("mlp", 0, 0)])


# ---------------------------------------------------------------- the screen on a smoke model


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    config = base_config("rte", "micro", "smoke")  # hidden 32, depth 2, heads 2, text dim 32, 2 solver steps
    workdir = tmp_path_factory.mktemp("ablation_run")
    abstract = train_state.model_config(config, caption_channels=config.text.dim)
    params = noisy(init_params(abstract, jax.random.key(0)))
    model = context.from_params(config, params, workdir, "smoke model")
    setup = train_state.build_run_setup(config, workdir, devices=jax.devices()[:1])
    setup.checkpointer.close()
    one_device = context.AnalysisModel(
        config,
        setup.model_cfg,
        jax.device_put(params, setup.state_shardings.ema_params),
        setup.conditioner,
        setup.tables,
        setup.mesh,
        setup.state_shardings.ema_params,
        "smoke model, 1 device",
    )
    assert model.mesh.size == 8 and one_device.mesh.size == 1
    return model, one_device


@pytest.fixture(scope="module")
def captions(smoke):
    return evaluate.eval_prompt_list(smoke[0].config)[:6]  # 6 rows: padded to 8 on the 8-device mesh


@pytest.fixture(scope="module")
def screened(smoke, captions):
    model, _ = smoke
    return ablation.screen(model, captions, ablation.single_head_masks(2, 2), chunk=4)


def assert_equal_but_for_summation_order(images, reference):
    """Images from programs whose batched matmuls have other shapes (another mesh, chunk, or the screen's vmap over
    masks against plain sampling): the CPU's kernels may then sum in another order (bit-equal on the AVX2 machines;
    46 of 663,552 pixels one level off on an AVX-512 Xeon, 1 of 24,576 for the MM-DiT baseline on an AMD EPYC), so
    the odd pixel may land one level off; an intervention that does anything moves far more."""
    assert np.abs(images.astype(int) - reference).max() <= 1 and (images != reference).mean() < 1e-3


def _plain_sampling(model, captions):
    """The captions sampled by the eval sampler, without any intervention."""
    eval_config = model.config.eval
    sampler = sampling.Sampler(
        model.model_cfg,
        model.conditioner,
        model.mesh,
        model.param_sh,
        cfg_scale=eval_config.cfg_scale,
        num_steps=eval_config.num_steps,
        solver=eval_config.solver,
        batch_size=len(captions),
        seed=eval_config.seed,
        negative=model.config.sample.negative,
    )
    return sampler(model.params, model.tables, captions)


def test_screen_baseline_row_is_plain_sampling(smoke, captions, screened):
    model, _ = smoke
    assert screened.shape == (9, 6, 64, 64, 3) and screened.dtype == np.uint8
    assert_equal_but_for_summation_order(screened[0], _plain_sampling(model, captions))
    changed = [not np.array_equal(screened[i], screened[0]) for i in range(1, 9)]
    assert all(changed[4:])  # every cross-attention head matters in the perturbed model
    assert any(changed[:4])


def test_screen_does_not_depend_on_the_mesh(smoke, captions, screened):
    _, one_device = smoke
    masks = ablation.single_head_masks(2, 2)
    for chunk in (4, 8):  # one device runs each matmul on 8x the rows of one of 8 devices
        assert_equal_but_for_summation_order(ablation.screen(one_device, captions, masks, chunk=chunk), screened)


def test_mean_screen_does_not_depend_on_the_mesh(smoke):
    model, one_device = smoke
    captions = evaluate.eval_prompt_list(model.config)[:6]  # padded to 8 on 8 devices; the padding enters no mean
    masks = ablation.single_head_masks(2, 2)[[0, 2, 7]]
    eight = ablation.screen(model, captions, masks, mode="mean")
    one = ablation.screen(one_device, captions, masks, mode="mean")
    assert_equal_but_for_summation_order(eight, one)  # batch means reduce across devices in another order too
    assert not np.array_equal(eight[1], eight[0]) and not np.array_equal(eight[2], eight[0])


def test_an_mmdit_screen_ablates_its_joint_heads(tmp_path):
    config = base_config("rte", "micro", "smoke", arch="mmdit")
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    params = noisy(arch.init_params(model_cfg, jax.random.key(0)))
    model = context.from_params(config, params, tmp_path, "smoke MM-DiT", devices=jax.devices()[:1])
    kinds = interventions.head_kinds(model.model_cfg)
    assert kinds == ("joint",) and ablation.single_head_labels(2, 2, kinds)[1] == ("joint", 0, 1)
    captions = evaluate.eval_prompt_list(config)[:2]
    masks = ablation.single_head_masks(2, 2, kinds)
    images = ablation.screen(model, captions, masks, chunk=5)
    assert images.shape == (5, 2, 64, 64, 3)
    assert_equal_but_for_summation_order(images[0], _plain_sampling(model, captions))
    assert all(not np.array_equal(images[i], images[0]) for i in range(1, 5))  # each joint head matters
    with pytest.raises(ValueError, match=r"kinds \('joint',\)"):
        ablation.screen(model, captions, ablation.single_head_masks(2, 2))  # PixArt's [M, 2, depth, heads]


# ---------------------------------------------------------------- effects


def _scenes(correct: np.ndarray) -> np.ndarray:
    """Renders "red square is above blue circle": correct layouts, or object 1 below object 2 where not."""
    n = len(correct)
    above = np.array([[32.0, 16.0], [32.0, 48.0]], np.float32)
    centers = np.where(correct[:, None, None], above, above[::-1])
    return scenes.render(np.tile([[2, 1]], (n, 1)), np.tile([[0, 1]], (n, 1)), centers)


def test_effects_of_known_scenes():
    n = 40
    captions = ["red square is above blue circle"] * n
    right, half = np.ones(n, bool), np.arange(n) % 2 == 0
    # depth 1, heads 2: rows = baseline, self H0, self H1, cross H0, cross H1
    rows = [right, right, right, half, right]
    images = np.stack([_scenes(r) for r in rows])
    images[2, :10] = 128  # self H1: the first 10 images blank (grey canvas)
    scenes_apart = np.arange(n)  # one caption, but each scene resampled as its own prompt
    result = ablation.effects(images, captions, shape=(2, 1, 2), clusters=scenes_apart)
    np.testing.assert_array_equal(result["accuracy"][:, SPATIAL], [1.0, 1.0, 0.75, 0.5, 1.0])
    np.testing.assert_array_equal(result["accuracy"][:, COLOR], [1.0, 1.0, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(result["effect"][:, OVERALL], [0.0, 0.0, -0.25, -0.5, 0.0])
    assert result["correct"].shape == (5, n, len(METRICS))
    low, high, effect = result["ci_low"], result["ci_high"], result["effect"]
    assert np.all(low <= effect + 1e-12) and np.all(effect <= high + 1e-12)
    assert low[3, SPATIAL] < -0.5 < high[3, SPATIAL] < 0  # the CI holds the effect and excludes 0
    assert high[2, COLOR] < 0
    for row in (0, 1, 4):  # identical to the baseline: paired resampling gives exactly 0
        assert low[row].max() == high[row].max() == 0.0
    assert result["effect_map"].shape == (2, 1, 2, len(METRICS))
    assert result["effect_map"][1, 0, 0, SPATIAL] == -0.5 and result["effect_map"][0, 0, 1, SPATIAL] == -0.25
    np.testing.assert_array_equal(ablation.effects(images, captions, clusters=scenes_apart)["ci_low"], low)  # seeded
    with pytest.raises(ValueError, match="single_head_masks"):
        ablation.effects(images, captions, shape=(2, 2, 2))


def test_effect_intervals_resample_whole_prompts(monkeypatch):
    """Every image of a prompt agrees, so the intervals are a bootstrap over prompts (a numpy reference here), twice
    as wide as the i.i.d. bootstrap over its 4 images."""
    prompts, per_prompt = 40, 4
    rng = np.random.default_rng(0)
    correct = np.stack([rng.random(prompts) < 0.6, rng.random(prompts) < 0.35])  # [baseline, mask] per prompt
    images = np.repeat(correct, per_prompt, axis=1).astype(np.uint8)[..., None, None, None]  # the bit as a pixel
    captions = [f"prompt {p}" for p in range(prompts) for _ in range(per_prompt)]

    def score_images(images, captions, detector):
        return dict.fromkeys(METRICS, images[:, 0, 0, 0] > 0), None

    monkeypatch.setattr(evaluate, "score_images", score_images)
    difference = correct[1].astype(float) - correct[0]
    picks = np.random.default_rng(1).integers(0, prompts, (20000, prompts))
    reference = np.percentile(difference[picks].mean(1), [2.5, 97.5])
    result = ablation.effects(images, captions, num_resamples=4000)
    interval = np.array([result["ci_low"][1, SPATIAL], result["ci_high"][1, SPATIAL]])
    np.testing.assert_allclose(interval, reference, atol=0.03)
    iid = ablation.effects(images, captions, num_resamples=4000, clusters=np.arange(len(captions)))
    assert iid["ci_high"][1, SPATIAL] - iid["ci_low"][1, SPATIAL] < 0.6 * np.ptp(reference)


def test_simultaneous_intervals_keep_their_coverage_over_every_screened_head(monkeypatch):
    """40 heads without any effect (each flips 15 % of the baseline's prompts, both ways alike) and one that breaks
    every image: some null heads' own intervals exclude 0 (5 % of them would), the simultaneous band excludes it for
    none of them, and still for the real effect."""
    prompts, per_prompt, null_heads = 40, 4, 40
    rng = np.random.default_rng(0)
    baseline = rng.random(prompts) < 0.5
    null = baseline ^ (rng.random((null_heads, prompts)) < 0.15)
    correct = np.concatenate([baseline[None], null, np.zeros((1, prompts), bool)])
    images = np.repeat(correct, per_prompt, axis=1).astype(np.uint8)[..., None, None, None]
    captions = [f"prompt {p}" for p in range(prompts) for _ in range(per_prompt)]
    monkeypatch.setattr(
        evaluate,
        "score_images",
        lambda images, captions, detector: (dict.fromkeys(METRICS, images[:, 0, 0, 0] > 0), None),
    )
    result = ablation.effects(images, captions, num_resamples=2000)
    low, high = result["ci_low"][:, SPATIAL], result["ci_high"][:, SPATIAL]
    sim_low, sim_high = result["sim_low"][:, SPATIAL], result["sim_high"][:, SPATIAL]
    null = slice(1, 1 + null_heads)
    assert ((low[null] > 0) | (high[null] < 0)).sum() >= 1
    assert not ((sim_low[null] > 0) | (sim_high[null] < 0)).any()
    assert np.all(sim_high[1:] - sim_low[1:] > high[1:] - low[1:])
    assert sim_high[-1] < 0


# ---------------------------------------------------------------- the report


def test_run_writes_the_report(smoke, tmp_path):
    model, _ = smoke
    directory = ablation.run(model, tmp_path, images_per_prompt=1, mode="both", top_heads=[("cross", 1, 0)])
    assert directory == tmp_path / "ablation"
    with np.load(directory / "ablation.npz") as data:
        assert data["masks"].shape == (9, 2, 2, 2) and len(data["captions"]) == 8
        for mode in ("zero", "mean"):
            assert data[f"accuracy_{mode}"].shape == data[f"ci_low_{mode}"].shape == (9, len(METRICS))
            assert data[f"effect_map_{mode}"].shape == (2, 2, 2, len(METRICS))
            assert data[f"set_effect_{mode}"].shape == (10, len(METRICS))
            np.testing.assert_array_equal(data[f"set_masks_{mode}"][1, 1, 1, 0], 0.0)
    for name in ("effect_map_zero", "effect_map_mean", "sample_grid"):
        png = np.asarray(Image.open(directory / f"{name}.png").convert("RGB"))
        assert png.shape[0] > 100 and png.std() > 10, name
    summary = (directory / "summary.md").read_text()
    for text in ("Baseline accuracy", "most harmful heads, zero", "most harmful heads, mean", "random sets", "compile"):
        assert text in summary, text
