"""The contour detector of Wang et al. 2026 ("Circuit Mechanisms for Spatial Relation Generation in Diffusion
Transformers"), re-implemented from the paper's description (not from its code) as a second opinion on
relcirc_jax.evaluation.detector. It returns the project's Detections, so scoring.score_detections scores it.

The paper's pipeline, written for 128 px scenes with objects of radius 16:
1. for each RGB channel separately: binary mask = channel > 180, external contours of the mask;
2. per contour: polygon = approxPolyDP(contour, 0.04 * perimeter); 3 vertices -> triangle, 4 -> square if the
   bounding rect has |w - h| < 5 (else a rectangle: no shape), more -> circle, fewer -> unknown;
   contours of area (cv2.contourArea) < 100 are dropped;
3. colour = the mean RGB inside the filled contour, each channel truncated to an integer as the paper's code does:
   red if R > 230, G < 25, B < 25; blue if B > 230, R < 25, G < 25; anything else is neither;
4. centre = integer bounding-rect centre (x + w // 2, y + h // 2), except that for a triangle h is the nominal
   height of a triangle of radius 16, 16 * sqrt(3) = 27.7 px (the paper's code overwrites h in its triangle branch),
   so a triangle's y is its top + 13 px whatever its drawn height.
Here the area threshold scales with (size / 128)^2 and the |w - h| tolerance with size / 128. Objects of neither
colour get color -1, unknown shapes and rectangles get shape -1: score_detections compares codes by equality, so
they match no caption colour or shape (a caption colour of None still matches any colour, -1 included).

Known blind spots (kept on purpose: this is the paper's detector):
- a pure red object is only in the R mask and a pure blue one only in the B mask, but an object bright in several
  channels (magenta, white, light gray) is found once per channel: several detections of colour -1;
- two touching objects of the same colour merge into one contour, mostly read as one circle (1-2 % of
  non-overlapping scenes fail this way); touching objects of different colours are in different masks and stay apart;
- the area threshold is a fixed pixel count (scaled here with size^2), so it assumes the renderer's radius size/8;
- vertex counting depends on resolution: at 64 px an object is ~16 px across and the 0.04-perimeter tolerance (2 px)
  is close to the pixel grid. On clean renders it still named all of ~2,750 separate objects right at both 64 and
  128 px, but a blur (sigma 1 px at 64) rounds corners and costs shapes (shape metric 94 -> 82 % at 64 px);
- the colour test is strict: a +-20 % per-channel colour cast (evaluation.degrade) pulls a pure channel under 230
  and the object becomes colour -1 (colour metric 100 -> 60 % at 64 px);
- the integer centre x + w // 2 is up to 0.5 px left of / above the mask's box centre x + w / 2 (pixel j covers
  [j, j+1)); against the renderer's centres it is off by -0.1 px on average and < 1 px on non-overlapping scenes;
  it is reported as is, as in the paper;
- the area is cv2.contourArea (polygon through boundary pixel centres), smaller than the pixel count.
"""

import cv2
import numpy as np

from relcirc_jax.data.spec import COLORS, SHAPES
from relcirc_jax.evaluation.detector import Detections, check_images

PAPER_SIZE = 128  # the paper's thresholds below are for 128 px images (object radius 16)
CHANNEL_THRESHOLD = 180  # a pixel is in channel k's mask when its value is > this
APPROX_EPSILON = 0.04  # approxPolyDP tolerance as a fraction of the contour's perimeter
MIN_AREA_AT_128 = 100.0  # contourArea below this is noise (scaled by (size / 128)^2)
SQUARE_TOLERANCE_AT_128 = 5  # |w - h| of the bounding rect below this -> square, else rectangle (scaled by size/128)
NOMINAL_RADIUS_AT_128 = 16.0  # the paper's triangle height for its centre: 2 * 16 * sqrt(3) / 2
COLOR_HIGH, COLOR_LOW = 230, 25  # red: mean R > 230, G < 25, B < 25; blue alike with B
_RED, _BLUE = COLORS.index("red"), COLORS.index("blue")
_TRIANGLE, _CIRCLE, _SQUARE = (SHAPES.index(s) for s in ("triangle", "circle", "square"))


def detect(images_uint8: np.ndarray) -> Detections:
    """All contours of every image, as the paper finds them; one row per (image, channel, contour) kept.

    color is an index into COLORS or -1 (neither), shape an index into SHAPES or -1 (unknown or rectangle); x, y the
    integer bounding-rect centre (as floats); area the contour's polygon area.
    """
    images = check_images(images_uint8)
    size = images.shape[1]
    scale = size / PAPER_SIZE
    min_area = MIN_AREA_AT_128 * scale**2
    square_tolerance = SQUARE_TOLERANCE_AT_128 * scale
    masks = (images > CHANNEL_THRESHOLD).view(np.uint8)  # 0/1, all images and channels at once
    rows = []  # (image, color, shape, x, y, area)
    for index, image in enumerate(images):
        for channel in range(3):
            contours, _ = cv2.findContours(
                np.ascontiguousarray(masks[index, :, :, channel]), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            for contour in contours:
                area = cv2.contourArea(contour)
                if area < min_area:
                    continue
                x, y, w, h = cv2.boundingRect(contour)
                vertices = len(cv2.approxPolyDP(contour, APPROX_EPSILON * cv2.arcLength(contour, True), True))
                shape = _shape(vertices, w, h, square_tolerance)
                centre_h = NOMINAL_RADIUS_AT_128 * scale * np.sqrt(3.0) if vertices == 3 else h
                rows.append((index, _color(image, contour, x, y, w, h), shape, x + w // 2, y + centre_h // 2, area))
    if not rows:
        return Detections(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
        )
    image, color, shape, x, y, area = (np.array(column) for column in zip(*rows))
    return Detections(
        image.astype(np.int64),
        color.astype(np.int64),
        shape.astype(np.int64),
        x.astype(np.float64),
        y.astype(np.float64),
        area.astype(np.float64),
    )


def _shape(vertices: int, w: int, h: int, square_tolerance: float) -> int:
    """SHAPES index from the approximated polygon's vertex count; -1 for a rectangle or fewer than 3 vertices."""
    if vertices == 3:
        return _TRIANGLE
    if vertices == 4:
        return _SQUARE if abs(w - h) < square_tolerance else -1
    return _CIRCLE if vertices > 4 else -1


def _color(image: np.ndarray, contour: np.ndarray, x: int, y: int, w: int, h: int) -> int:
    """COLORS index of the mean RGB inside the filled contour (drawn on its bounding-rect crop), or -1."""
    inside = np.zeros((h, w), np.uint8)
    cv2.drawContours(inside, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
    r, g, b = np.trunc(image[y : y + h, x : x + w][inside.view(bool)].mean(axis=0))  # the paper: tuple(map(int, ...))
    if r > COLOR_HIGH and g < COLOR_LOW and b < COLOR_LOW:
        return _RED
    if b > COLOR_HIGH and r < COLOR_LOW and g < COLOR_LOW:
        return _BLUE
    return -1
