"""Scene renderer: the relation rule table, shape geometry (checked against PIL drawing), colours, the overlap rule,
sampling for a given relation, and clear errors on bad input."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from relcirc_jax.data import scenes
from relcirc_jax.data.spec import BACKGROUND_RGB, COLOR_RGB, COLORS, RELATIONS, SHAPES


def _rel(dx, dy, size=64):
    """Relation name of object 1 placed (dx, dy) px from object 2 at the canvas centre."""
    centers = np.array([[[size / 2 + dx, size / 2 + dy], [size / 2, size / 2]]])
    return RELATIONS[scenes.relation_index(centers, size=size)[0]]


@pytest.mark.parametrize(
    "size,dx,dy,expected",
    [
        (64, 0, -10, "above"),
        (64, 0, 10, "below"),
        (64, -10, 0, "left"),
        (64, 10, 0, "right"),
        (64, -10, -10, "upper_left"),
        (64, 10, -10, "upper_right"),
        (64, -10, 10, "lower_left"),
        (64, 10, 10, "lower_right"),
        # the paper's threshold: 5 px at 128 px, 2.5 px at 64 px
        (64, 2.5, -10, "above"),
        (64, -2.5, 10, "below"),
        (64, 2.51, -10, "upper_right"),
        (64, -2.51, 10, "lower_left"),
        (64, -10, 2.5, "left"),
        (64, 10, -2.5, "right"),
        (64, -10, 2.51, "lower_left"),
        (64, 10, -2.51, "upper_right"),
        (64, 2, 1, "below"),
        (64, 2, -1, "above"),  # both within the threshold: the vertical rule decides first
        (64, 0, 0, "below"),
        (128, 5.0, -20, "above"),
        (128, 5.5, -20, "upper_right"),
        (128, -20, 5.0, "left"),
        (128, -20, -5.5, "upper_left"),
        (128, 3, 30, "below"),
        (128, 30, 4.5, "right"),
    ],
)
def test_relation_rule_table(size, dx, dy, expected):
    assert _rel(dx, dy, size) == expected


def test_relation_index_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[N, 2, 2\]"):
        scenes.relation_index(np.zeros((3, 4)))


def _pil_coverage(shape, cx, cy, r, size, scale=8):
    """Reference: the fraction of each pixel a PIL drawing covers, at `scale` x supersampling."""
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, s = cx * scale, cy * scale, r * scale
    if shape == "circle":
        draw.ellipse([x - s, y - s, x + s, y + s], fill=255)
    elif shape == "square":
        draw.rectangle([x - s, y - s, x + s, y + s], fill=255)
    else:
        half_h = s * np.sqrt(3) / 2
        draw.polygon([(x, y - half_h), (x - s, y + half_h), (x + s, y + half_h)], fill=255)
    return np.asarray(canvas, np.float32).reshape(size, scale, size, scale).mean(axis=(1, 3)) / 255


@pytest.mark.parametrize("size,radius", [(64, 8), (128, 16), (32, 4)])
def test_shapes_match_pil_drawing_and_exact_areas(size, radius):
    rng = np.random.default_rng(0)
    shape_idx = np.repeat(np.arange(3), 4)[:, None].repeat(2, axis=1)
    centers = np.empty((len(shape_idx), 2, 2), np.float32)
    centers[:, 0] = rng.uniform(radius + 1, size / 2 - 1, (len(shape_idx), 2))
    centers[:, 1] = size - radius - 1  # object 2 out of the way in the far corner
    color_idx = np.zeros_like(shape_idx)  # red on gray: red channel = 128 + 127 * coverage
    images = scenes.render(shape_idx, color_idx, centers, size=size, radius=radius)
    coverage = (images[..., 0].astype(np.float32) - 128) / 127
    masks = scenes.object_masks(shape_idx, centers, size=size, radius=radius)
    for i, k in enumerate(shape_idx[:, 0]):
        exact = scenes.shape_area(k, radius)
        reference = sum(_pil_coverage(SHAPES[k], *centers[i, j], radius, size) for j in range(2))
        # the one-pixel ramp only approximates the true coverage at corners
        assert np.abs(coverage[i] - reference).sum() <= 0.05 * 2 * exact + radius, SHAPES[k]
        assert abs(coverage[i].sum() - 2 * exact) <= 0.03 * 2 * exact
        assert abs(masks[i, 0].sum() - exact) <= radius + 0.03 * exact  # quantisation grows with the perimeter


def test_render_colours_background_and_object2_on_top():
    shape_idx = np.array([[SHAPES.index("square"), SHAPES.index("circle")]])
    color_idx = np.array([[COLORS.index("red"), COLORS.index("blue")]])
    centers = np.array([[[20.5, 20.5], [34.5, 20.5]]], np.float32)  # overlapping on x in [26.5, 28.5]
    image = scenes.render(shape_idx, color_idx, centers)
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    assert tuple(image[0, 20, 20]) == COLOR_RGB["red"]
    assert tuple(image[0, 20, 34]) == COLOR_RGB["blue"]
    assert tuple(image[0, 20, 27]) == COLOR_RGB["blue"]  # inside both: object 2 wins
    assert tuple(image[0, 60, 60]) == BACKGROUND_RGB
    palette = {tuple(p) for p in image.reshape(-1, 3)}
    assert {COLOR_RGB["red"], COLOR_RGB["blue"], BACKGROUND_RGB} <= palette


def test_sampled_layouts_respect_bounds_and_overlap_rule():
    rng = np.random.default_rng(1)
    size, radius = 64, 8
    shape_idx = rng.integers(0, 3, (600, 2))
    centers = scenes.sample_centers(rng, shape_idx, size=size, radius=radius)
    assert centers.shape == (600, 2, 2) and centers.dtype == np.float32
    assert centers.min() >= radius + 1 and centers.max() <= size - radius - 1
    assert scenes.overlap_fraction(shape_idx, centers, radius=radius).max() <= scenes.MAX_OVERLAP_FRACTION
    masks = scenes.object_masks(shape_idx, centers, size=size, radius=radius)  # independent pixel-level check
    smaller = np.minimum(*[scenes.shape_area(shape_idx[:, k], radius) for k in range(2)])
    assert ((masks[:, 0] & masks[:, 1]).sum(axis=(1, 2)) / smaller).max() <= 0.08
    assert (scenes.overlap_fraction(shape_idx, centers, radius=radius) > 0).any()  # touching layouts do occur


@pytest.mark.parametrize("size", [64, 128])
def test_sampling_for_a_given_relation(size):
    rng = np.random.default_rng(2)
    wanted = np.repeat(np.arange(len(RELATIONS)), 25)
    shape_idx = rng.integers(0, 3, (len(wanted), 2))
    centers = scenes.sample_centers(rng, shape_idx, size=size, radius=size / 8, relation_idx=wanted)
    np.testing.assert_array_equal(scenes.relation_index(centers, size=size), wanted)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="shape_idx"):
        scenes.render(np.zeros((2, 3), np.int64), np.zeros((2, 2), np.int64), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="shape_idx"):
        scenes.render(np.full((1, 2), 3), np.zeros((1, 2), np.int64), np.full((1, 2, 2), 30.0))
    with pytest.raises(ValueError, match="color_idx"):
        scenes.render(np.zeros((1, 2), np.int64), np.full((1, 2), 2), np.full((1, 2, 2), 30.0))
    with pytest.raises(ValueError, match="centers"):
        scenes.render(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="relation_idx"):
        scenes.sample_centers(np.random.default_rng(0), np.zeros((2, 2), np.int64), relation_idx=np.array([0, 8]))
    with pytest.raises(ValueError, match="too large"):
        scenes.sample_centers(np.random.default_rng(0), np.zeros((2, 2), np.int64), size=16, radius=8)
