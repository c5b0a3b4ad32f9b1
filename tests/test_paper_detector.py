"""The paper's contour detector (evaluation.paper_detector) on fresh renders and on hand-drawn odd objects."""

import cv2
import numpy as np
import pytest

from relcirc_jax.data import scenes
from relcirc_jax.data.spec import COLORS, SHAPES, SceneSpec
from relcirc_jax.evaluation import paper_detector
from relcirc_jax.evaluation.scoring import encode_specs, score_detections

_CIRCLE, _SQUARE, _TRIANGLE = (SHAPES.index(s) for s in ("circle", "square", "triangle"))


def _scenes(seed: int, n: int, size: int):
    """Renders as selfcheck.random_scenes makes them, with the truth: (images, shape_idx, color_idx, centers)."""
    rng = np.random.default_rng(seed)
    radius = size / 8
    shape_idx = rng.integers(0, len(SHAPES), (n, 2))
    color_idx = rng.integers(0, len(COLORS), (n, 2))
    centers = scenes.sample_centers(rng, shape_idx, size=size, radius=radius)
    return scenes.render(shape_idx, color_idx, centers, size=size, radius=radius), shape_idx, color_idx, centers


def _match(det, shape_idx, color_idx, centers):
    """Per scene: exactly two detections, one per true object with its colour and shape (centre within 2 px);
    and the centre errors (dx, dy) of the matched objects."""
    found = np.zeros(len(shape_idx), bool)
    errors = []
    for i in range(len(shape_idx)):
        rows = np.flatnonzero(det.image == i)
        hits = []
        for k in range(2):  # each hit: (dx, dy, is_triangle)
            error = np.stack([det.x[rows] - centers[i, k, 0], det.y[rows] - centers[i, k, 1]], -1)
            same = (det.color[rows] == color_idx[i, k]) & (det.shape[rows] == shape_idx[i, k])
            near = same & (np.abs(error).max(-1, initial=0) <= 2)
            if near.any():
                hits.append((*error[near.argmax()], shape_idx[i, k] == _TRIANGLE))
        errors += hits
        found[i] = len(hits) == 2 and len(rows) == 2
    return found, np.array(errors, float)


@pytest.mark.parametrize("size, seed", [(128, 0), (64, 1)])
def test_finds_both_objects_in_scenes_without_overlap(size, seed):
    images, shape_idx, color_idx, centers = _scenes(seed, 400, size)
    apart = scenes.overlap_fraction(shape_idx, centers, radius=size / 8) == 0  # the occluded ones lose pixels
    found, errors = _match(paper_detector.detect(images[apart]), shape_idx[apart], color_idx[apart], centers[apart])
    # Measured on these seeds: 370/372 (99.5 %) at 128 px, 368/374 (98.4 %) at 64 px; the misses are same-colour
    # objects close enough that their > 180 masks touch (8-connected) and merge into one contour.
    assert found.mean() >= 0.95, found.mean()
    # x + w // 2 is an integer pixel index, ~0.1 px left of / above the continuous box centre on average; a triangle's
    # y is its top + half the nominal height (the paper's code), up to 1.6 px above its box centre here.
    triangle = errors[:, 2].astype(bool)
    assert np.abs(errors[~triangle, :2]).max() <= 1.0 and np.abs(errors[triangle, 0]).max() <= 1.0
    assert -2.0 <= errors[triangle, 1].min() and errors[triangle, 1].max() <= 1.0


def test_a_triangle_centre_is_its_top_plus_half_the_nominal_height_as_in_the_papers_code():
    image = _canvas()
    for left, top, height in ((10, 10, 28), (70, 10, 40), (10, 70, 24)):  # one nominal, one taller, one shorter
        points = np.array([[left + 16, top], [left, top + height - 1], [left + 32, top + height - 1]], np.int32)
        cv2.fillPoly(image[0], [points], (0, 0, 255))
    det = paper_detector.detect(image)
    assert det.shape.tolist() == [_TRIANGLE] * 3
    assert sorted(det.y.tolist()) == [10 + 13, 10 + 13, 70 + 13]  # 16 * sqrt(3) = 27.7 px nominal height at 128 px


def test_a_colour_counts_by_the_integer_part_of_its_mean_as_in_the_papers_code():
    image = _canvas()
    cv2.circle(image[0], (32, 32), 16, (230, 0, 0), thickness=cv2.FILLED)  # mean R 230.x would pass "> 230" as floats
    cv2.circle(image[0], (33, 32), 3, (255, 0, 0), thickness=cv2.FILLED)
    det = paper_detector.detect(image)
    assert det.color.tolist() == [-1]


def _canvas(size: int = 128) -> np.ndarray:
    return np.full((1, size, size, 3), 128, np.uint8)


def test_neither_colour_and_unknown_shape_get_minus_one():
    image = _canvas()
    cv2.rectangle(image[0], (10, 10), (41, 41), (0, 255, 0), thickness=cv2.FILLED)  # green square: G mask only
    cv2.circle(image[0], (90, 30), 16, (220, 220, 220), thickness=cv2.FILLED)  # light gray: in all three masks
    cv2.rectangle(image[0], (10, 80), (70, 95), (255, 0, 0), thickness=cv2.FILLED)  # red 61 x 16: a rectangle
    cv2.circle(image[0], (100, 100), 16, (255, 0, 255), thickness=cv2.FILLED)  # magenta: R and B masks
    det = paper_detector.detect(image)
    found = sorted(zip(det.x.astype(int).tolist(), det.y.astype(int).tolist(), det.color.tolist(), det.shape.tolist()))
    assert found == sorted(
        [(26, 26, -1, _SQUARE)]
        + [(90, 30, -1, _CIRCLE)] * 3
        + [(40, 88, COLORS.index("red"), -1)]
        + [(100, 100, -1, _CIRCLE)] * 2
    )


def test_minus_one_codes_match_no_caption_colour_or_shape_but_none_matches_any_colour():
    image = _canvas()
    cv2.circle(image[0], (30, 64), 16, (0, 255, 0), thickness=cv2.FILLED)  # a green circle left of ...
    cv2.rectangle(image[0], (80, 48), (111, 79), (0, 0, 255), thickness=cv2.FILLED)  # ... a blue square
    det = paper_detector.detect(image)
    assert sorted(zip(det.color.tolist(), det.shape.tolist())) == [(-1, _CIRCLE), (COLORS.index("blue"), _SQUARE)]

    def overall(spec):
        return bool(score_detections(det, encode_specs([spec]), size=128)["overall"][0])

    assert overall(SceneSpec("circle", None, "left", "square", "blue"))
    assert not overall(SceneSpec("circle", "red", "left", "square", "blue"))
    assert not overall(SceneSpec("circle", "blue", "left", "square", "blue"))


def test_small_and_empty_images():
    blank = paper_detector.detect(_canvas(64))
    assert all(len(column) == 0 for column in blank)
    image = _canvas(64)
    cv2.circle(image[0], (20, 20), 2, (255, 0, 0), thickness=cv2.FILLED)  # below the area threshold (25 at 64 px)
    cv2.circle(image[0], (44, 44), 8, (255, 0, 0), thickness=cv2.FILLED)
    det = paper_detector.detect(image)
    assert det.x.tolist() == [44.0] and det.y.tolist() == [44.0] and det.shape.tolist() == [_CIRCLE]


def test_rejects_float_images_with_the_fix():
    with pytest.raises(ValueError, match=r"astype\(np.uint8\)"):
        paper_detector.detect(np.zeros((1, 64, 64, 3), np.float32))
