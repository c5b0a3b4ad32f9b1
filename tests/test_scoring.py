"""The paper's metric definitions (scoring.py) on detections made by hand: the unique-binding gate on both relation
forms, overall and overall_loose, the loose margin, and the columns that map onto the paper's table."""

import numpy as np
import pytest

from relcirc_jax.data.spec import COLORS, SHAPES, SceneSpec
from relcirc_jax.evaluation import METRICS, PAPER_COLUMNS, Detections, encode_specs, score_detections


def _detections(objects_per_image):
    """Detections from [[(colour, shape, x, y), ...] per image]."""
    rows = [
        (i, COLORS.index(c), SHAPES.index(s), x, y)
        for i, objects in enumerate(objects_per_image)
        for c, s, x, y in objects
    ]
    image, color, shape, x, y = (np.array(v) for v in zip(*rows))
    return Detections(image, color, shape, x.astype(float), y.astype(float), np.full(len(rows), 100))


def _score(objects_per_image, spec, size=64):
    return score_detections(_detections(objects_per_image), encode_specs([spec] * len(objects_per_image)), size=size)


RED_CIRCLE_ABOVE_BLUE_SQUARE = SceneSpec("circle", "red", "above", "square", "blue")


def test_a_second_matching_object_fails_both_relation_forms():
    good = [("red", "circle", 30, 10), ("blue", "square", 30, 40)]
    extra = good + [("red", "circle", 50, 50)]  # another red circle, below: the description no longer binds uniquely
    out = _score([good, extra], RED_CIRCLE_ABOVE_BLUE_SQUARE)
    np.testing.assert_array_equal(out["unique_binding"], [True, False])
    np.testing.assert_array_equal(out["spatial_relationship"], [True, False])
    np.testing.assert_array_equal(out["spatial_relationship_loose"], [True, False])
    np.testing.assert_array_equal(out["overall"], [True, False])
    np.testing.assert_array_equal(out["overall_loose"], [True, False])
    np.testing.assert_array_equal(out["spatial_relationship_ungated"], [True, True])  # the first match is above
    assert np.all(out["spatial_relationship"] <= out["unique_binding"])


def test_every_detection_counts_however_many_larger_ones_an_image_has():
    good = [("red", "circle", 30, 10), ("blue", "square", 30, 40)]
    noise = [("blue", "triangle", 5 * k, 60) for k in range(12)]  # larger objects no description names
    det = _detections([good + noise])
    det = det._replace(area=np.r_[100, 100, np.full(12, 400)])
    out = score_detections(det, encode_specs([RED_CIRCLE_ABOVE_BLUE_SQUARE]), size=64)
    assert out["overall"][0] and out["unique_binding"][0]


def test_overall_needs_colour_shape_binding_and_the_strict_relation():
    scenes = [
        [("red", "circle", 30, 10), ("blue", "square", 31.5, 40)],  # straight above within 2.5 px: strict and loose
        [("red", "circle", 26, 10), ("blue", "square", 30, 40)],  # 4 px left too: upper_left, still loosely above
        [("red", "circle", 30, 38.5), ("blue", "square", 30, 40)],  # only 1.5 px higher: inside the loose margin
        [("blue", "circle", 30, 10), ("red", "square", 30, 40)],  # colours swapped: no binding
    ]
    out = _score(scenes, RED_CIRCLE_ABOVE_BLUE_SQUARE)
    np.testing.assert_array_equal(out["overall"], [True, False, True, False])
    np.testing.assert_array_equal(out["overall_loose"], [True, True, False, False])
    np.testing.assert_array_equal(out["color"], [True] * 4)
    np.testing.assert_array_equal(out["unique_binding"], [True, True, True, False])


@pytest.mark.parametrize("size,margin", [(64, 2.5), (128, 5.0)])
def test_loose_margin_is_the_papers_5_px_at_128(size, margin):
    spec = SceneSpec("circle", "red", "left", "square", "blue")
    scenes = [[("red", "circle", 20, 30), ("blue", "square", 20 + margin + d, 30)] for d in (-0.01, 0.01)]
    np.testing.assert_array_equal(_score(scenes, spec, size)["spatial_relationship_loose"], [False, True])


def test_paper_columns_name_metrics():
    assert set(PAPER_COLUMNS.values()) <= set(METRICS)
    assert PAPER_COLUMNS["Spatial Relation"] == "spatial_relationship_loose"
