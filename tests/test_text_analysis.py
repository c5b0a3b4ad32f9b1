"""Text analyses: prompt variants, variance partition, relation arithmetic (tiny random DiT and the shipped model)."""

import types

import jax
import numpy as np
import pytest
from PIL import Image

from relcirc_jax import pretrained
from relcirc_jax.analysis import capture, context, groups, text
from relcirc_jax.config import base_config
from relcirc_jax.data import prompts
from relcirc_jax.data.spec import SceneSpec
from relcirc_jax.evaluation.scoring import METRICS
from relcirc_jax.models import dit
from relcirc_jax.train import evaluate
from relcirc_jax.train import state as train_state

CAPTION = "red circle is above blue square"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DiT with random weights on one device (weights drawn in numpy: no compile of DiT.init)."""
    config = base_config("rte", "micro", "smoke")
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    shapes = jax.eval_shape(lambda: dit.init_params(model_cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(np.float32), shapes)
    return context.from_params(config, params, tmp_path_factory.mktemp("tiny"), "tiny", devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def plain_sampler(tiny):
    return capture.sampler(tiny, 2)


def test_prompt_variants_rewrite_a_known_caption():
    variants = {v.name: v for v in text.prompt_variants([CAPTION, "blue triangle is to the left of the red circle"])}
    assert tuple(variants) == text.VARIANTS
    above = SceneSpec("circle", "red", "above", "square", "blue")
    expected = {
        "original": ("red circle is above blue square", above),
        "drop_relation": ("red circle blue square", above),
        "replace_relation": ("red circle is below blue square", above._replace(relation="below")),
        "drop_shape1": ("red is above blue square", above),
        "drop_shape2": ("red circle is above blue", above),
        "filler": ("the red circle is above the blue square", above),
        "synonym": ("red circle is directly above blue square", above),
    }
    for name, (caption, spec) in expected.items():
        assert (variants[name].captions[0], variants[name].specs[0]) == (caption, spec), name
    # the second caption keeps its template ("the" before object 2) and phrasing index
    assert variants["replace_relation"].captions[1] == "blue triangle is to the right of the red circle"
    assert variants["drop_relation"].captions[1] == "blue triangle the red circle"
    assert variants["synonym"].captions[1] == "blue triangle is left of the red circle"
    assert [text.is_grammatical(v.captions[0]) for v in variants.values()] == [
        name not in text.UNGRAMMATICAL for name in variants
    ]


def test_factor_r2_finds_the_one_factor_that_matters():
    rng = np.random.default_rng(0)
    n = 600
    labels = {name: rng.integers(0, 3, n) for name in ("a", "b", "c")}
    means = rng.normal(size=(3, 16)) * 5
    vectors = means[labels["b"]] + 0.01 * rng.normal(size=(n, 16))
    r2 = text.factor_r2(vectors, labels)
    assert r2["b"] > 0.99
    assert r2["a"] < 0.02 and r2["c"] < 0.02
    # two factors adding independent effects share the variance by their sizes
    r2 = text.factor_r2(means[labels["a"]] + 2 * means[labels["c"]], labels)
    assert abs(r2["a"] + r2["c"] - 1) < 0.05 and r2["c"] > 3 * r2["a"]


@pytest.mark.parametrize("terms", [[("relation", "phrasing")], [("shape1",), ("relation",), ("color2",)]])
def test_phrasing_is_its_share_within_relation(monkeypatch, terms):
    """Embeddings that sum a random vector per value of each term: one per phrase (relation and phrasing index) is
    all relation and phrasing; shape1 + relation + color2 ignores the phrasing, which then explains nothing."""
    captions, labels = text.partition_captions()
    rng = np.random.default_rng(0)
    vectors = 0
    for term in terms:
        names, index = np.unique([str(values) for values in zip(*(labels[f] for f in term))], return_inverse=True)
        vectors = vectors + rng.normal(size=(len(names), 16))[index]
    tokens = dict(zip(captions, vectors[:, None]))  # caption -> its one token, valid; the same after the projection
    monkeypatch.setattr(text, "embed", lambda model, c: (np.stack([tokens[x] for x in c]), np.ones((len(c), 1), bool)))
    monkeypatch.setattr(text, "project", lambda model, embedded, mask: embedded)
    monkeypatch.setattr(groups, "token_roles", lambda conditioner, c: np.zeros((len(c), 1), int))  # only "mean" pools
    r2 = text.variance_partition(types.SimpleNamespace(conditioner=None))["variance_partition"]  # [space, factor]
    np.testing.assert_allclose(r2.sum(1), 1.0, atol=1e-6)  # the shares of an additive embedding add up to 100 %
    phrasing = r2[:, text.FACTORS.index("phrasing")]
    if len(terms) == 1:
        np.testing.assert_allclose(r2[:, text.FACTORS.index("relation")] + phrasing, 1.0, atol=1e-6)
        assert np.all(phrasing > 0.5)
    else:
        np.testing.assert_allclose(phrasing, 0.0, atol=1e-6)


def test_variance_partition_of_rte_shape2_token_is_shape2(tiny):
    """RTE embeds each word on its own, so the shape2 word's token carries shape2 (and its position) only."""
    out = text.variance_partition(tiny)
    assert out["variance_partition"].shape == (2, len(text.FACTORS))
    shape2 = out["r2"][list(text.POOLS).index("shape2")]  # [space, factor]
    assert np.all(shape2[:, text.FACTORS.index("shape2")] > 0.95)
    assert np.all(np.delete(shape2, text.FACTORS.index("shape2"), axis=1) < 0.03)
    assert np.all((out["r2"] >= 0) & (out["r2"] <= 1 + 1e-9))


def test_word_sampler_draws_the_plain_samplers_images(tiny, plain_sampler):
    captions = [CAPTION, "blue triangle is to the left of the red circle"]
    plain = plain_sampler(tiny.params, tiny.tables, captions)
    words = text.WordSampler(tiny, 2)(captions)
    np.testing.assert_allclose(words.astype(int), plain.astype(int), atol=1)


def test_cached_encoders_skip_ungrammatical_variants(tiny):
    cached = tiny._replace(conditioner=tiny.conditioner._replace(name="minilm"))  # embeds by caption_index
    out = text.prompt_ablation(cached, [CAPTION], 1, variants=("original", "drop_relation"))
    assert list(out["variants"]) == ["original", "drop_relation"]
    assert np.isfinite(out["accuracy"][0]).all() and np.isnan(out["accuracy"][1]).all()


def test_zero_delta_reproduces_the_baseline_images(tiny, plain_sampler):
    assert not np.any(text.relation_delta(tiny, "above", "above"))
    out = text.relation_arithmetic(tiny, 1, pairs=(("above", "above"),), held_out=2)
    baseline, edited = out["images"][0]
    np.testing.assert_array_equal(edited, baseline)
    plain = plain_sampler(tiny.params, tiny.tables, list(out["captions"][0]))
    np.testing.assert_allclose(baseline.astype(int), plain.astype(int), atol=1)
    np.testing.assert_array_equal(out["arithmetic"][0, 0], out["arithmetic"][0, 1])


@pytest.mark.parametrize("old, new", [("above", "below"), ("left", "right")])
def test_the_relation_delta_carries_a_held_out_caption_to_the_new_relation(tiny, old, new):
    """RTE embeds each word and position on its own and the paired captions differ only in the relation word, so
    e(caption with old) + delta = e(caption with new) on every held-out scene (the delta is e(new) - e(old))."""
    delta = text.relation_delta(tiny, old, new)
    held_out = text._pair_specs(old)[1][:3]
    old_text, old_mask = text.embed(tiny, [prompts.caption(s) for s in held_out])
    new_text, new_mask = text.embed(tiny, [prompts.caption(s._replace(relation=new)) for s in held_out])
    np.testing.assert_array_equal(old_mask, new_mask)
    np.testing.assert_allclose(old_text + delta, new_text, atol=1e-6)
    assert np.abs(delta).max() > 0.1


def test_shipped_model_follows_the_replaced_relation_word_and_run_writes_the_report(tmp_path):
    config, params = pretrained.load("rte_dit_micro")
    model = context.from_params(config, params, tmp_path, "rte_dit_micro", devices=jax.devices()[:1])
    captions = evaluate.eval_prompt_list(config)[4:8]  # red square vs blue triangle, the four diagonal relations
    directory = text.run(model, tmp_path / "analysis", images_per_prompt=1, captions=captions, held_out=1)  # 32 images

    arrays = np.load(directory / "text.npz")
    assert arrays["ablation_accuracy"].shape == (len(text.VARIANTS), len(METRICS))
    assert arrays["variance_partition"].shape == (2, len(text.FACTORS))
    assert arrays["arithmetic"].shape == (2, 2, 2, len(METRICS))
    new = arrays["ablation_accuracy"][text.VARIANTS.index("replace_relation")]  # against the replaced word
    old = arrays["ablation_replace_relation_old"]  # the same images against the original relation
    loose, strict = METRICS.index("spatial_relationship_loose"), METRICS.index("spatial_relationship")
    assert new[loose] >= 0.5 and new[loose] > old[loose] + 0.3 and new[strict] > old[strict], (new, old)
    for name in ("prompt_ablation", "variance_partition", "relation_arithmetic", "arithmetic_samples"):
        assert np.asarray(Image.open(directory / f"{name}.png")).std() > 0, name
    summary = (directory / "summary.md").read_text()
    assert "replace_relation" in summary and "Wall time" in summary and "phrasing within relation" in summary
