"""evaluation.annotate: boxes in the right place and colour, verdict banner colours, shapes, errors."""

import numpy as np
import pytest

from relcirc_jax.data.spec import COLORS, SHAPES
from relcirc_jax.evaluation import detect, score_specs, selfcheck
from relcirc_jax.evaluation.annotate import (
    BOX_RGB,
    FAIL_RGB,
    MISSING_RGB,
    PASS_RGB,
    VERDICT_TAGS,
    annotate,
    banner_height,
)
from relcirc_jax.evaluation.detector import Detections

SIZE, SCALE = 64, 4
_ALL_PASS = {key: np.array([True]) for _, key in VERDICT_TAGS} | {"overall": np.array([True])}


def _one(color: int, x: float = 20.0, y: float = 30.0) -> Detections:
    return Detections(
        np.array([0]),
        np.array([color]),
        np.array([SHAPES.index("circle")]),
        np.array([x]),
        np.array([y]),
        np.array([200.0]),
    )


def _gray(n: int = 1) -> np.ndarray:
    return np.full((n, SIZE, SIZE, 3), 128, np.uint8)


def test_shape_dtype_and_the_box_around_a_known_object():
    out = annotate(_gray(2), _one(COLORS.index("red")), {}, scale=SCALE)
    assert out.shape == (2, SIZE * SCALE + banner_height(SCALE), SIZE * SCALE, 3) and out.dtype == np.uint8
    half = (SIZE / 8 + 1) * SCALE  # box half-side: radius + 1 px, upscaled
    x, y = 20 * SCALE, 30 * SCALE
    yellow = BOX_RGB[COLORS.index("red")]
    for row, col in [(y, x - half), (y, x + half), (y - half, x), (y + half, x), (y, x)]:  # 4 sides and the cross
        assert tuple(out[0, int(row), int(col)]) == yellow, (row, col)
    assert tuple(out[0, y, x - 5 * SCALE]) == (128, 128, 128)  # inside the box, off the cross: the image
    assert (out[1, : SIZE * SCALE] == 128).all()  # the other image has no detections


@pytest.mark.parametrize("color", [COLORS.index("blue"), -1])
def test_box_colour_follows_the_object_colour(color):
    out = annotate(_gray(), _one(color), {}, scale=SCALE)
    assert tuple(out[0, 30 * SCALE, 20 * SCALE]) == BOX_RGB[color]


def _banner_pixels(verdicts: dict) -> np.ndarray:
    return annotate(_gray(), _one(0), verdicts, scale=SCALE)[0, SIZE * SCALE :].reshape(-1, 3)


def _count(pixels: np.ndarray, rgb: tuple) -> int:
    return int((pixels == rgb).all(-1).sum())


def test_banner_turns_red_where_a_verdict_fails():
    passing = _banner_pixels(_ALL_PASS)
    assert _count(passing, PASS_RGB) > 0 and _count(passing, FAIL_RGB) == 0
    failing = _banner_pixels(_ALL_PASS | {"spatial_relationship": np.array([False]), "overall": np.array([False])})
    # Two of six tags turned red: about a third of the coloured banner.
    assert 0.25 < _count(failing, FAIL_RGB) / (_count(failing, FAIL_RGB) + _count(failing, PASS_RGB)) < 0.4
    assert _count(_banner_pixels({}), MISSING_RGB) > 0 and _count(_banner_pixels({}), PASS_RGB) == 0


def test_real_scenes_with_score_specs_verdicts_and_errors():
    images, specs = selfcheck.random_scenes(np.random.default_rng(0), 3)
    out = annotate(images, detect(images), score_specs(images, specs), scale=2)
    assert out.shape == (3, SIZE * 2 + banner_height(2), SIZE * 2, 3)
    with pytest.raises(ValueError, match=r"bool\[3\]"):
        annotate(images, detect(images), {"color": np.ones(2, bool)})
    with pytest.raises(ValueError, match="positive integer"):
        annotate(images, detect(images), {}, scale=0)
    with pytest.raises(ValueError, match=r"astype\(np.uint8\)"):
        annotate(images / 255.0, detect(images), {})
