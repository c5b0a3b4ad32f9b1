"""Training batches (dataset.train_batch): determinism across process counts, agreement with specs; eval prompt sets."""
import importlib
import sys

import numpy as np
import pytest

from relcirc_jax.data import dataset, prompts, scenes
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES
from relcirc_jax.text import tokenizer

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
        "image": ((GLOBAL, 64, 64, 3), np.float32), "ids": ((GLOBAL, 20), np.int32), "mask": ((GLOBAL, 20), np.bool_),
        "roles": ((GLOBAL, 20), np.int8), "caption_index": ((GLOBAL,), np.int32), "shape_idx": ((GLOBAL, 2), np.int32),
        "color_idx": ((GLOBAL, 2), np.int32), "relation": ((GLOBAL,), np.int32), "centers": ((GLOBAL, 2, 2), np.float32),
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


def test_train_mix_varies_phrasing_and_colours_but_never_uses_filler():
    many = dataset.train_batch(0, 0, global_batch=256, size=32, radius=4)
    parsed = [prompts.parse(prompts.all_captions()[i]) for i in many["caption_index"]]
    assert "the" not in {p.words[0] for p in parsed}
    canonical = [" ".join(w for w, r in zip(p.words, p.roles) if r == "relation") == prompts.PHRASINGS[p.spec.relation][0]
                 for p in parsed]
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
        (dict(global_batch=10, process_count=4), "global_batch \\(10\\) must be a positive multiple of process_count \\(4\\)"),
        (dict(global_batch=8, process_index=2, process_count=2), "process_index \\(2\\)"),
        (dict(global_batch=8, caption_mix="fancy"), "Unknown caption_mix 'fancy'.*canonical.*train"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataset.train_batch(0, 0, **kwargs)


def test_eval_prompt_sets_sizes_uniqueness_and_membership():
    sizes = {name: len(dataset.eval_prompts(name)) for name in ("all_combinations", "phrasing", "filler")}
    assert sizes == {"all_combinations": 288, "phrasing": 36 * 14, "filler": 288}
    every = set(prompts.all_captions())
    for name in sizes:
        captions = dataset.eval_prompts(name)
        assert len(set(captions)) == len(captions) and set(captions) <= every
        assert dataset.eval_prompts(name) == captions
    assert dataset.eval_prompts() == dataset.eval_prompts("all_combinations")
    assert dataset.eval_prompts()[0] == "red triangle is above red triangle"
    specs = {prompts.parse(c).spec for c in dataset.eval_prompts()}
    assert len(specs) == 288 and all(s.color1 and s.color2 for s in specs)
    assert all(c.startswith("the ") for c in dataset.eval_prompts("filler"))
    assert isinstance(dataset.EVAL_SET_VERSION, int)


def test_unknown_eval_set_lists_names():
    with pytest.raises(ValueError, match="Unknown eval prompt set 'nope'.*all_combinations.*filler.*phrasing"):
        dataset.eval_prompts("nope")


def test_tfds_builder_writes_the_pipeline_examples_in_order(tmp_path):
    pytest.importorskip("tensorflow_datasets")
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
