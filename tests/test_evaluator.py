"""Evaluator: accuracy bounds on fresh clean / degraded renders and wrong captions (small seeded samples), metric
definitions on hand-made scenes, caption parsing, and clear errors on bad input."""

import numpy as np
import pytest

from relcirc_jax.data import scenes
from relcirc_jax.data.spec import COLORS, SHAPES, SceneSpec
from relcirc_jax.evaluation import METRICS, degrade, detect, score, score_specs
from relcirc_jax.evaluation.selfcheck import WRONG_KINDS, accuracy_report


@pytest.mark.parametrize("size,n", [(64, 800), (128, 200)])
def test_accuracy_bounds(size, n):
    report = accuracy_report(n, size=size, seed=7)
    assert report["clean_overall_pct"] >= 99.5, report
    assert report["degraded_overall_pct"] >= 98.0, report
    for kind in WRONG_KINDS:
        assert report[f"wrong_{kind}_accepted_pct"] <= 1.0, report


def _scene(objects, size=64):
    """One image with the given (shape, colour, x, y) objects, drawn in order (later ones on top)."""
    image = np.full((size, size, 3), 128, np.uint8)
    for shape, color, x, y in objects:
        layer = scenes.render(
            np.array([[SHAPES.index(shape)] * 2]),
            np.array([[COLORS.index(color)] * 2]),
            np.array([[[x, y], [x, y]]], np.float32),
            size=size,
            radius=size / 8,
        )[0]
        drawn = np.any(layer != 128, axis=-1)
        image[drawn] = layer[drawn]
    return image[None]


def _spec(text):
    color1, shape1, relation, color2, shape2 = (None if w == "-" else w for w in text.split())
    return SceneSpec(shape1, color1, relation, shape2, color2)


def test_detector_finds_colour_shape_and_centre():
    det = detect(_scene([("triangle", "red", 20.3, 40.7), ("square", "blue", 45.5, 15.2)]))
    order = np.argsort(det.color)
    assert [COLORS[c] for c in det.color[order]] == ["red", "blue"]
    assert [SHAPES[s] for s in det.shape[order]] == ["triangle", "square"]
    np.testing.assert_allclose(np.stack([det.x, det.y], 1)[order], [[20.3, 40.7], [45.5, 15.2]], atol=0.15)


def test_metrics_on_hand_made_scenes():
    image = _scene([("circle", "red", 15, 15), ("square", "blue", 45, 40)])
    cases = {  # spec -> expected (color, shape, exist, unique, spatial, loose)
        "red circle upper_left blue square": (1, 1, 1, 1, 1, 1),
        "- circle upper_left - square": (1, 1, 1, 1, 1, 1),  # colours left out match any colour
        "red circle left blue square": (1, 1, 1, 1, 0, 1),  # loose: only dx < -m is asked
        "red circle above blue square": (1, 1, 1, 1, 0, 1),
        "blue circle upper_left red square": (1, 1, 0, 0, 0, 0),  # swapped colours: no blue circle
        "red triangle upper_left blue square": (1, 0, 0, 0, 0, 0),
        "red circle lower_right blue square": (1, 1, 1, 1, 0, 0),
    }
    out = score_specs(np.repeat(image, len(cases), 0), [_spec(t) for t in cases])
    expected = np.array(list(cases.values()), bool)
    names = ("color", "shape", "exist_binding", "unique_binding", "spatial_relationship", "spatial_relationship_loose")
    for j, name in enumerate(names):
        np.testing.assert_array_equal(out[name], expected[:, j], err_msg=name)
    np.testing.assert_array_equal(out["overall"], expected[:, 3] & expected[:, 4])
    np.testing.assert_allclose(out["centers"][0], [15, 15, 45, 40], atol=0.15)


def test_unique_binding_needs_exactly_one_match_and_nan_when_missing():
    three = _scene([("circle", "red", 12, 12), ("circle", "red", 50, 12), ("square", "blue", 30, 45)])
    out = score_specs(three, [_spec("red circle above blue square")])
    assert out["exist_binding"][0] and not out["unique_binding"][0] and not out["overall"][0]
    one = _scene([("circle", "red", 12, 12)])
    out = score_specs(one, [_spec("red circle above blue square")])
    assert not out["exist_binding"][0] and not out["spatial_relationship"][0]
    assert np.isfinite(out["centers"][0, :2]).all() and np.isnan(out["centers"][0, 2:]).all()


def test_same_description_objects_and_shape_only_binding():
    pair = _scene([("circle", "red", 20, 15), ("circle", "red", 22, 45)])
    texts = ["red circle above red circle", "red circle below red circle", "red circle left red circle"]
    out = score_specs(np.repeat(pair, 3, 0), [_spec(t) for t in texts])
    np.testing.assert_array_equal(out["overall"], [True, True, False])  # either order may satisfy alike objects
    mixed = _scene([("circle", "blue", 20, 15), ("circle", "red", 22, 45)])
    out = score_specs(np.repeat(mixed, 2, 0), [_spec("- circle above red circle"), _spec("- circle below red circle")])
    np.testing.assert_array_equal(out["overall"], [True, False])  # the specific description binds first


def test_touching_same_colour_objects_are_split():
    pair = _scene([("square", "red", 20, 20), ("square", "red", 21, 35.5)])  # share an edge: one blob
    out = score_specs(pair, [_spec("red square above red square")])
    assert out["overall"][0]
    np.testing.assert_allclose(np.sort(out["centers"][0, [1, 3]]), [20, 35.5], atol=0.6)


def test_score_parses_captions():
    image = _scene([("circle", "red", 15, 15), ("square", "blue", 45, 40)])
    out = score(
        np.repeat(image, 2, 0),
        ["red circle is to the upper left of blue square", "blue square is to the upper left of red circle"],
    )
    assert set(METRICS) <= set(out) and out["centers"].shape == (2, 4)
    np.testing.assert_array_equal(out["overall"], [True, False])


def test_degrade_keeps_format_and_changes_pixels():
    image = _scene([("circle", "red", 15, 15)])
    damaged = degrade(np.repeat(image, 2, 0), np.random.default_rng(0))
    assert damaged.dtype == np.uint8 and damaged.shape == (2, 64, 64, 3)
    assert np.abs(damaged.astype(int) - image.astype(int)).mean() > 3
    assert not np.array_equal(damaged[0], damaged[1])


def test_bad_input_raises_clear_errors():
    spec = [_spec("red circle above blue square")]
    with pytest.raises(ValueError, match="uint8"):
        score_specs(np.zeros((1, 64, 64, 3), np.float32), spec)
    with pytest.raises(ValueError, match=r"\[N, size, size, 3\]"):
        score_specs(np.zeros((64, 64, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="one per image"):
        score_specs(np.zeros((2, 64, 64, 3), np.uint8), spec)
    with pytest.raises(ValueError, match="unknown shape"):
        score_specs(np.zeros((1, 64, 64, 3), np.uint8), [SceneSpec("hexagon", "red", "above", "circle", None)])
    with pytest.raises(ValueError, match="uint8"):
        degrade(np.zeros((1, 64, 64, 3), np.float32), np.random.default_rng(0))
