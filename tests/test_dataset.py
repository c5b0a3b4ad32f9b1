"""Training batches (dataset.train_batch): determinism across process counts, agreement with specs; eval prompt sets."""

import importlib
import sys

import numpy as np
import pytest
from scipy import stats

from relcirc_jax.analysis import diversity
from relcirc_jax.data import dataset, prompts, scenes, tokenizer
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec

GLOBAL = 48
SMALL_CHUNK = 16  # GLOBAL / 3 and GLOBAL / 4 slices then cross chunk boundaries


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def batch():
    return dataset.train_batch(3, 11, global_batch=GLOBAL)


def test_keys_shapes_dtypes_and_ranges(batch):
    expected = {
        "image": ((GLOBAL, 64, 64, 3), np.float32),
        "ids": ((GLOBAL, 20), np.int32),
        "mask": ((GLOBAL, 20), np.bool_),
        "roles": ((GLOBAL, 20), np.int8),
        "caption_index": ((GLOBAL,), np.int32),
        "shape_idx": ((GLOBAL, 2), np.int32),
        "color_idx": ((GLOBAL, 2), np.int32),
        "relation": ((GLOBAL,), np.int32),
        "centers": ((GLOBAL, 2, 2), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["shape_idx"].max() < len(SHAPES) and batch["color_idx"].max() < len(COLORS)


@pytest.mark.parametrize("chunk", [SMALL_CHUNK, dataset.CHUNK])
@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_process_slices_concatenate_to_the_single_process_batch(monkeypatch, process_count, chunk):
    monkeypatch.setattr(dataset, "CHUNK", chunk)
    batch = dataset.train_batch(3, 11, global_batch=GLOBAL)
    slices = [
        dataset.train_batch(3, 11, global_batch=GLOBAL, process_index=i, process_count=process_count)
        for i in range(process_count)
    ]
    assert all(len(s["relation"]) == GLOBAL // process_count for s in slices)
    _assert_batches_equal({k: np.concatenate([s[k] for s in slices]) for k in batch}, batch)


def test_example_depends_only_on_seed_step_and_position(batch):
    _assert_batches_equal(dataset.train_batch(3, 11, global_batch=GLOBAL), batch)
    smaller = dataset.train_batch(3, 11, global_batch=16)
    _assert_batches_equal(smaller, {k: v[:16] for k, v in batch.items()})
    for other in (dataset.train_batch(3, 12, global_batch=GLOBAL), dataset.train_batch(4, 11, global_batch=GLOBAL)):
        assert not np.array_equal(other["image"], batch["image"])
        assert not np.array_equal(other["caption_index"], batch["caption_index"])


def test_images_and_captions_agree_with_specs(batch):
    np.testing.assert_array_equal(scenes.relation_index(batch["centers"], size=64), batch["relation"])
    expected_image = scenes.render(batch["shape_idx"], batch["color_idx"], batch["centers"], size=64, radius=8)
    np.testing.assert_allclose(batch["image"], expected_image / 127.5 - 1.0, atol=1e-6)
    captions = [prompts.all_captions()[i] for i in batch["caption_index"]]
    for row, text in enumerate(captions):
        spec = prompts.parse(text).spec
        assert spec.relation == RELATIONS[batch["relation"][row]]
        assert (spec.shape1, spec.shape2) == tuple(SHAPES[i] for i in batch["shape_idx"][row])
        for color, index in zip((spec.color1, spec.color2), batch["color_idx"][row]):
            assert color in (None, COLORS[index])
    ids, mask = tokenizer.encode(captions)
    np.testing.assert_array_equal(batch["ids"], ids)
    np.testing.assert_array_equal(batch["mask"], mask)
    np.testing.assert_array_equal(batch["roles"], tokenizer.roles(captions))


def _relation_law(size: int, radius: float) -> np.ndarray:
    """P(relation) when both centres are uniform on [r+1, size-r-1]^2 (the paper's task), in RELATIONS order.

    dx = x1 - x2 is triangular on [-L, L]: P(|dx| <= t) = 2t/L - (t/L)^2. above/below need |dx| <= t (then the
    sign of dy, 1/2 each); left/right need |dx| > t and |dy| <= t; each diagonal needs both beyond t, a quarter each.
    """
    length, t = size - 2 * radius - 2, scenes.direct_threshold(size)
    near = 2 * t / length - (t / length) ** 2
    return np.array([near / 2] * 2 + [(1 - near) * near / 2] * 2 + [(1 - near) ** 2 / 4] * 4)


@pytest.mark.parametrize("size,radius,n", [(64, 8, 4096), (128, 16, 2048)])
def test_paper_task_rules_and_relation_frequencies(size, radius, n):
    batch = dataset.train_batch(5, 0, global_batch=n, size=size, radius=radius)
    shapes, colors, centers = batch["shape_idx"], batch["color_idx"], batch["centers"]
    assert (shapes[:, 0] != shapes[:, 1]).all()  # always two different shapes
    np.testing.assert_array_equal(np.sort(colors, axis=1), np.tile([[0, 1]], (n, 1)))  # one red, one blue
    assert 0.45 < np.mean(colors[:, 0] == 0) < 0.55  # the subject's colour is random
    assert centers.min() >= radius + 1 and centers.max() <= size - radius - 1
    np.testing.assert_array_equal(scenes.relation_index(centers, size=size), batch["relation"])
    frequencies = np.bincount(batch["relation"], minlength=len(RELATIONS)) / n
    law = _relation_law(size, radius)
    assert np.all(np.abs(frequencies - law) <= 4 * np.sqrt(law * (1 - law) / n)), (frequencies, law)  # 4 std errors
    assert law[4:].sum() > 0.75  # diagonals dominate, as in the paper's data
    overlapping = scenes.overlap_fraction(shapes, centers, radius=radius) > 0.05
    assert overlapping.mean() > 0.01  # no overlap rejection


@pytest.mark.parametrize(
    "relations, law", [("uniform", np.full(8, 1 / 8)), ("straight_heavy", np.array([1 / 6] * 4 + [1 / 12] * 4))]
)
def test_drawn_relations_keep_the_paper_scenes_follow_their_law_and_draw_each_layout_from_its_relations_law(
    relations, law
):
    n, size, radius = 4096, 32, 4
    batch = dataset.train_batch(5, 0, global_batch=n, size=size, radius=radius, relations=relations)
    shapes, colors, centers = batch["shape_idx"], batch["color_idx"], batch["centers"]
    assert (shapes[:, 0] != shapes[:, 1]).all()
    np.testing.assert_array_equal(np.sort(colors, axis=1), np.tile([[0, 1]], (n, 1)))
    assert centers.min() >= radius + 1 and centers.max() <= size - radius - 1
    np.testing.assert_array_equal(scenes.relation_index(centers, size=size), batch["relation"])
    frequencies = np.bincount(batch["relation"], minlength=len(RELATIONS)) / n
    assert np.all(np.abs(frequencies - law) <= 4 * np.sqrt(law * (1 - law) / n)), frequencies  # 4 std errors
    assert (scenes.overlap_fraction(shapes, centers, radius=radius) > 0.05).mean() > 0.01  # the paper's: no rejection
    # Given its relation, a layout follows the paper's law (centres uniform, conditioned on the relation), here
    # against the diversity study's own rejection sampler of that law.
    for relation in ("above", "lower_right"):
        got = centers[batch["relation"] == RELATIONS.index(relation)].reshape(-1, 4) / size
        want = diversity.reference_layouts(
            SceneSpec("circle", "red", relation, "square", "blue"), 4000, seed=1, size=size, radius=radius
        )
        for column in range(4):
            assert stats.ks_2samp(got[:, column], want[:, column]).pvalue > 1e-4, (relation, column)


def test_each_tasks_relations_default_is_its_own_draw():
    for task, own, other in (("paper", "scene", "uniform"), ("balanced", "uniform", "scene")):
        default = dataset.train_batch(2, 3, global_batch=64, size=32, radius=4, task=task)
        _assert_batches_equal(
            default, dataset.train_batch(2, 3, global_batch=64, size=32, radius=4, task=task, relations=own)
        )
        assert not np.array_equal(
            default["centers"],
            dataset.train_batch(2, 3, global_batch=64, size=32, radius=4, task=task, relations=other)["centers"],
        )
    balanced_scenes = dataset.train_batch(2, 3, global_batch=512, size=32, radius=4, task="balanced", relations="scene")
    shapes, centers = balanced_scenes["shape_idx"], balanced_scenes["centers"]
    assert scenes.overlap_fraction(shapes, centers, radius=4).max() <= scenes.MAX_OVERLAP_FRACTION
    np.testing.assert_array_equal(scenes.relation_index(centers, size=32), balanced_scenes["relation"])
    assert np.bincount(balanced_scenes["relation"], minlength=8)[4:].sum() > 0.7 * 512  # read off: diagonals dominate


def test_paper_caption_mix_keeps_each_colour_with_probability_half_and_uniform_phrasing():
    batch = dataset.train_batch(1, 0, global_batch=4096, size=32, radius=4)
    parsed = [prompts.parse(prompts.all_captions()[i]) for i in batch["caption_index"]]
    kept = np.array([(p.spec.color1 is not None, p.spec.color2 is not None) for p in parsed])
    assert np.all(np.abs(kept.mean(0) - 0.5) < 0.03) and abs(np.corrcoef(kept.T)[0, 1]) < 0.05  # independent
    assert {p.template for p in parsed} == {"plain"}
    straight = [p.phrasing for p in parsed if p.spec.relation in ("above", "below")]
    np.testing.assert_allclose(np.bincount(straight) / len(straight), [1 / 3] * 3, atol=0.07)


def test_fixed_scene_set_epochs_are_permutations_and_deterministic():
    num_scenes, batch_size = 100, 16
    steps = [
        dataset.train_batch(2, step, global_batch=batch_size, size=32, radius=4, num_scenes=num_scenes)
        for step in range(2 * num_scenes // batch_size + 1)
    ]
    stream = {k: np.concatenate([b[k] for b in steps]) for k in steps[0]}
    key = lambda i: (stream["caption_index"][i], *stream["centers"][i].ravel())  # noqa: E731
    first, second = [{key(i) for i in range(e * num_scenes, (e + 1) * num_scenes)} for e in range(2)]
    assert len(first) == num_scenes and first == second  # each epoch shows every scene once, with its own caption
    assert [key(i) for i in range(10)] != [key(num_scenes + i) for i in range(10)]  # in a new order
    again = dataset.train_batch(2, 7, global_batch=batch_size, size=32, radius=4, num_scenes=num_scenes)
    _assert_batches_equal(again, steps[7])  # a resumed run at step 7 sees exactly the same batch
    halves = [
        dataset.train_batch(
            2, 7, global_batch=batch_size, size=32, radius=4, num_scenes=num_scenes, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    _assert_batches_equal({k: np.concatenate([h[k] for h in halves]) for k in again}, again)
    other_seed = dataset.train_batch(3, 0, global_batch=batch_size, size=32, radius=4, num_scenes=num_scenes)
    assert not np.array_equal(other_seed["centers"], steps[0]["centers"])


def test_train_mix_varies_phrasing_and_colours_but_never_uses_filler():
    many = dataset.train_batch(0, 0, global_batch=256, size=32, radius=4, task="balanced")
    parsed = [prompts.parse(prompts.all_captions()[i]) for i in many["caption_index"]]
    assert "the" not in {p.words[0] for p in parsed}
    canonical = [
        " ".join(w for w, r in zip(p.words, p.roles) if r == "relation") == prompts.PHRASINGS[p.spec.relation][0]
        for p in parsed
    ]
    assert 0.45 < np.mean(canonical) < 0.75
    colour_optional = np.mean([p.spec.color1 is None or p.spec.color2 is None for p in parsed])
    assert 0.1 < colour_optional < 0.3
    assert len(set(many["relation"].tolist())) == len(RELATIONS)


def test_canonical_mix_gives_canonical_full_colour_captions():
    plain = dataset.train_batch(0, 0, global_batch=32, size=32, radius=4, caption_mix="canonical")
    canonical = set(dataset.eval_prompts("all_combinations"))
    assert all(prompts.all_captions()[i] in canonical for i in plain["caption_index"])


def test_with_filler_mix_uses_filler_on_about_half():
    mixed = dataset.train_batch(0, 0, global_batch=64, size=32, radius=4, caption_mix="with_filler")
    filler = np.mean([prompts.all_captions()[i].startswith("the ") for i in mixed["caption_index"]])
    assert 0.3 < filler < 0.7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(global_batch=10, process_count=4),
            "global_batch \\(10\\) must be a positive multiple of process_count \\(4\\)",
        ),
        (dict(global_batch=8, process_index=2, process_count=2), "process_index \\(2\\)"),
        (dict(global_batch=8, caption_mix="fancy"), "Unknown caption_mix 'fancy'.*canonical.*train"),
        (dict(global_batch=8, task="fancy"), "Unknown task 'fancy'.*paper.*balanced"),
        (dict(global_batch=8, relations="even"), "Unknown relations 'even'.*scene.*uniform"),
        (dict(global_batch=8, num_scenes=0), "num_scenes \\(0\\) must be >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataset.train_batch(0, 0, **kwargs)


def test_eval_prompt_sets_sizes_uniqueness_and_membership():
    sizes = {name: len(dataset.eval_prompts(name)) for name in dataset.EVAL_SETS}
    assert sizes == {
        "paper_main": 96,
        "paper_robustness": 6 * 264,
        "all_combinations": 288,
        "phrasing": 36 * 14,
        "filler": 288,
    }
    every = set(prompts.all_captions())
    for name in sizes:
        captions = dataset.eval_prompts(name)
        assert len(set(captions)) == len(captions) and set(captions) <= every
        assert dataset.eval_prompts(name) == captions
    assert dataset.eval_prompts("all_combinations")[0] == "red triangle is above red triangle"
    specs = {prompts.parse(c).spec for c in dataset.eval_prompts("all_combinations")}
    assert len(specs) == 288 and all(s.color1 and s.color2 for s in specs)
    assert all(c.startswith("the ") for c in dataset.eval_prompts("filler"))
    assert isinstance(dataset.EVAL_SET_VERSION, int)


def test_paper_prompt_sets():
    main = dataset.eval_prompts()
    assert main == dataset.eval_prompts("paper_main")
    assert main[:6] == [
        "red square is above the blue triangle",
        "red square is below the blue triangle",
        "red square is to the left of the blue triangle",
        "red square is to the right of the blue triangle",
        "red square is above and to the left of the blue triangle",
        "red square is above and to the right of the blue triangle",
    ]
    assert main[-1] == "blue circle is below and to the right of the red triangle"
    specs = [prompts.parse(c).spec for c in main]
    assert len(set(specs)) == 96 and all(s.shape1 != s.shape2 and {s.color1, s.color2} == set(COLORS) for s in specs)
    assert np.bincount([RELATIONS.index(s.relation) for s in specs]).tolist() == [12] * 8
    robustness = dataset.eval_prompts("paper_robustness")
    templates = [prompts.parse(c).template for c in robustness]
    assert {t: templates.count(t) for t in set(templates)} == {t: 264 for t in dataset.PAPER_ROBUSTNESS_TEMPLATES}
    assert "red square directly above the blue triangle" in robustness
    assert "diagonally down and right from red triangle is blue circle" in robustness
    assert "the blue circle is right of the red triangle" in robustness


def test_unknown_eval_set_lists_names():
    with pytest.raises(ValueError, match="Unknown eval prompt set 'nope'.*all_combinations.*filler.*paper_main"):
        dataset.eval_prompts("nope")


def test_tfds_builder_writes_the_pipeline_examples_in_order(tmp_path):
    from relcirc_jax.data import tfds_builder

    config = tfds_builder.RelcircShapesConfig(name="tiny", size=32, radius=4, num_train=5, num_validation=2)
    builder = tfds_builder.RelcircShapes(config=config, data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    train = builder.as_data_source(split="train")
    assert len(train) == 5 and len(builder.as_data_source(split="validation")) == 2
    expected = dataset.train_batch(0, 0, global_batch=256, size=32, radius=4)
    for k in range(5):
        record = train[k]
        np.testing.assert_array_equal(record["image"], np.rint((expected["image"][k] + 1) * 127.5).astype(np.uint8))
        assert record["caption"].decode() == prompts.all_captions()[expected["caption_index"][k]]
        assert record["relation"] == expected["relation"][k]
        np.testing.assert_array_equal(record["centers"], expected["centers"][k])


def test_tfds_builder_without_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    monkeypatch.delitem(sys.modules, "relcirc_jax.data.tfds_builder", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'relcirc_jax\[tfds\]'"):
        importlib.import_module("relcirc_jax.data.tfds_builder")
