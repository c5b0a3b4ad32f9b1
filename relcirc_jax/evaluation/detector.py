"""Find the coloured objects in scene images: colour, shape and centre of every blob, for a whole batch at once.

Pipeline, vectorised over the batch (scipy labels all images of a chunk in one call; chunks of 256 images stay in cache
and run on a thread per core):
1. colour coverage: undo the image's colour cast (the median pixel is the gray background), then each pixel's
   red-ness R - max(G, B) (blue-ness alike) over the pure colour's gives coverage in [0, 1];
2. masks (coverage > 0.45) with small holes closed, 4-connected blobs per colour, speckles (< 0.3 r^2 for the
   nominal radius r; the smallest object read, a triangle at 0.75 r, is 0.97 r^2) dropped;
3. a blob too large for one object (wider or taller than an object of 1.25 r, plus 2 px per 64 px: two touching
   objects of the same colour) is cut at the contact (_split_blob);
4. coverage-weighted moments over the blob grown by 2 px per 64 px (sub-pixel exact; speckles, noise and the
   blur's edge barely move them): mass m, centroid, and about the centroid E[u^2], E[v^2], E[u^2 v^2], E[v^3]
   (u right, v down);
5. shape from two ratios of those moments that do not depend on the object's size, so objects drawn at any radius
   are read alike: skew E[v^3] / E[v^2]^1.5 and cornerness E[u^2 v^2] / (E[u^2] E[v^2]); exactly (-0.566, 0.8) for
   an upward triangle, (0, 2/3) for a circle, (0, 1) for a square (whose x and y are independent, and stay so under
   Gaussian blur). Blur pulls both towards a Gaussian's (0, 1) a little, so the prototypes sit between the clean and
   the blurred values: (-0.52, 0.8), (0, 0.675), (0, 0.99); nearest prototype wins;
6. centre = the coverage-weighted centroid, reported in the renderer's convention: the bounding-box centre, which
   for a triangle sits h/6 above its centroid, h = sqrt(sqrt(3) A) the height of an equilateral triangle of the
   blob's own mask area A (unlike the mass, the area does not shrink when noise, clipping or a paler colour lower
   the coverage; measured bias of the triangle centre within 0.08 px, clean or degraded, at 64 and 128 px).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from relcirc_jax.data.spec import BACKGROUND_RGB, COLORS, SHAPES

MASK_THRESHOLD = 0.45  # colour coverage (0 = background, 1 = pure object colour) above which a pixel is the object
MIN_AREA_PER_R2 = 0.3  # smaller blobs are speckles (a triangle is 1.73 r^2, 0.97 r^2 at 0.75 r)
CENTROID_RING_AT_64 = 2  # px around a mask that still count for its moments: blur (sigma 1) and anti-aliasing
MAX_SIZE_PER_R = 1.25  # objects may be drawn up to this many nominal radii large (and down to 0.75)
SINGLE_OBJECT_EXTENT_AT_64 = 2.0  # extra px over 2 * 1.25 r a lone object's bounding box may reach (blur, speckles)
# A merged blob's second object must have an inscribed radius >= r / 3: a triangle's is 0.58 r (0.43 r at 0.75 r),
# while the corner of a square left outside its inscribed disc holds at most 0.25 r (0.31 r at 1.25 r).
MIN_SECOND_CORE_PER_R = 0.33
_IN_PLANE_CROSS = np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))], bool)
_TRIANGLE = SHAPES.index("triangle")
# Shape prototypes in (skew, cornerness) (see the module docstring) and the spread used to compare the two features.
_PROTOTYPES = np.array([{"triangle": (-0.52, 0.8), "circle": (0.0, 0.675), "square": (0.0, 0.99)}[s] for s in SHAPES])
_FEATURE_SCALE = np.array([0.25, 0.15])
_CHUNK = 256
_EMPTY = {
    key: np.zeros(0, np.int64 if key in ("image", "color") else np.float64)
    for key in ("image", "color", "area", "width", "height", "mass", "x", "y", "skew", "cornerness")
}


class Detections(NamedTuple):
    """One row per detected object, over the whole batch (flat arrays of equal length)."""

    image: np.ndarray  # int, index of the image in the batch
    color: np.ndarray  # int, index into COLORS
    shape: np.ndarray  # int, index into SHAPES
    x: np.ndarray  # float, centre in pixels (pixel j covers [j, j+1))
    y: np.ndarray
    area: np.ndarray  # int, pixels in the object's mask


def check_images(images_uint8: np.ndarray) -> np.ndarray:
    """Validate a batch of square RGB uint8 images; returns it as an ndarray."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(
            "images must be square RGB uint8 of shape [N, size, size, 3], got "
            f"{images.dtype}{list(images.shape)}; convert floats with (x * 255).round().astype(np.uint8)"
        )
    return images


def color_coverage(images_uint8: np.ndarray) -> np.ndarray:
    """float32[len(COLORS), N, H, W]: how much of each pixel is each object colour, ~0 on background, ~1 inside.

    The median pixel is the gray background, so dividing by it undoes a per-channel colour cast; the colour excess
    (R - max(G, B) for red) is then linear in an object's coverage, and is divided by the pure colour's excess.
    """
    images = check_images(images_uint8)
    background = np.median(images[:, ::4, ::4].reshape(len(images), -1, 3), axis=1)  # objects cover < 1/6
    gain = np.asarray(BACKGROUND_RGB, np.float32) / np.maximum(background, 1).astype(np.float32)
    r, g, b = (np.multiply(images[..., k], gain[:, k, None, None], dtype=np.float32) for k in range(3))
    pure = 255 * np.minimum(gain, 1)  # a pure channel clipped at 255 by the cast, then balanced
    excess = {"red": (r, np.maximum(g, b), pure[:, 0]), "blue": (b, np.maximum(r, g), pure[:, 2])}
    coverage = np.empty((len(COLORS),) + r.shape, np.float32)
    for out, color in zip(coverage, COLORS):
        own, others, scale = excess[color]
        np.subtract(own, others, out=out)
        out *= (1 / scale)[:, None, None]
    return np.clip(coverage, 0, 1, out=coverage)


def detect(images_uint8: np.ndarray, *, radius: float | None = None) -> Detections:
    """All objects in the batch. radius (default size * 8 / 64, the renderer's ratio) is the nominal object radius:
    it only sizes the speckle threshold and the merged-blob split; shape and centre do not depend on it."""
    images = check_images(images_uint8)
    size = images.shape[1]
    radius = size * 8 / 64 if radius is None else float(radius)
    ring = int(np.ceil(CENTROID_RING_AT_64 * size / 64))
    max_extent = 2 * MAX_SIZE_PER_R * radius + SINGLE_OBJECT_EXTENT_AT_64 * size / 64

    def chunk_blobs(start):
        found = []
        for color, cover in enumerate(color_coverage(images[start : start + _CHUNK])):
            blobs = _color_blobs(cover, radius, ring, max_extent)
            blobs["image"] += start
            blobs["color"] = np.full(len(blobs["mass"]), color)
            found.append(blobs)
        return found

    starts = range(0, len(images), _CHUNK)  # chunks keep the working set in cache
    with ThreadPoolExecutor(max(1, min(len(starts), os.cpu_count() or 1))) as pool:  # numpy and scipy drop the GIL
        blobs = [b for found in pool.map(chunk_blobs, starts) for b in found]  # in chunk order: deterministic
    blob = {key: np.concatenate([b[key] for b in blobs]) for key in blobs[0]} if blobs else _EMPTY
    features = np.stack([blob["skew"], blob["cornerness"]], axis=-1)
    distance = (((features[:, None, :] - _PROTOTYPES[None]) / _FEATURE_SCALE) ** 2).sum(-1)
    shape = distance.argmin(-1)
    height = np.sqrt(np.sqrt(3.0) * blob["area"])  # of an equilateral triangle of this mask area
    y = blob["y"] - np.where(shape == _TRIANGLE, height / 6, 0.0)  # centroid -> bounding-box centre
    return Detections(blob["image"], blob["color"], shape, blob["x"], y, blob["area"])


def _color_blobs(cover: np.ndarray, radius: float, ring: int, max_extent: float) -> dict:
    """Objects of one colour, coverage [N, H, W]: label the mask, split merged pairs, drop speckles, then measure
    hard area and bounding box on the mask and coverage-weighted moments on the mask grown by `ring` px."""
    min_area = MIN_AREA_PER_R2 * radius**2
    labels, count = ndimage.label(_fill_small_holes(cover > MASK_THRESHOLD, min_area), structure=_IN_PLANE_CROSS)
    hard = _mask_stats(labels, count)
    extent = np.maximum(hard["width"], hard["height"])
    for index in np.flatnonzero((hard["area"] >= min_area) & (extent > max_extent)):
        crop = labels[
            hard["image"][index],
            hard["top"][index] : hard["top"][index] + hard["height"][index],
            hard["left"][index] : hard["left"][index] + hard["width"][index],
        ]
        count = _split_blob(crop, index + 1, count + 1, radius)
    if count > len(hard["area"]):
        hard = _mask_stats(labels, count)
    keep = hard["area"] >= min_area
    soft = _soft_stats(labels, _grow(labels, ring), cover, count)
    return {key: value[keep] for key, value in {**hard, **soft}.items()}


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Close holes (e.g. speckles inside an object) smaller than max_area px: small components of the background."""
    holes, count = ndimage.label(~mask, structure=_IN_PLANE_CROSS)
    small = np.bincount(holes.reshape(-1), minlength=count + 1) < max_area
    small[0] = False
    return mask | small[holes] if small.any() else mask  # clean renders have none: skip the gather


def _pixel_coordinates(flat_index: np.ndarray, shape: tuple):
    """(image, row, column) of flat indices into an [N, H, W] array."""
    image, rest = np.divmod(flat_index, shape[1] * shape[2])
    row, col = np.divmod(rest, shape[2])
    return image, row, col


def _mask_stats(labels: np.ndarray, count: int) -> dict:
    """image, area and bounding box (top, left, width, height) of labels 1..count, from the labelled pixels only."""
    where = np.flatnonzero(labels)
    label = labels.reshape(-1)[where] - 1
    image, row, col = _pixel_coordinates(where, labels.shape)

    def extreme(ufunc, values, start):
        out = np.full(count, start)
        ufunc.at(out, label, values)
        return out

    top, left = extreme(np.minimum, row, np.iinfo(np.int64).max), extreme(np.minimum, col, np.iinfo(np.int64).max)
    bottom, right = extreme(np.maximum, row, -1), extreme(np.maximum, col, -1)
    owner = np.zeros(count, np.int64)
    owner[label] = image
    return {
        "image": owner,
        "area": np.bincount(label, minlength=count),
        "top": top,
        "left": left,
        "height": bottom - top + 1,
        "width": right - left + 1,
    }


def _grow(labels: np.ndarray, ring: int) -> np.ndarray:
    """Labels spread `ring` px (4-neighbour steps) into the background; where two meet the larger label wins."""
    grown = labels
    for _ in range(ring):
        previous, grown = grown, grown.copy()
        for axis in (1, 2):
            head = [slice(None)] * 3
            tail = [slice(None)] * 3
            head[axis], tail[axis] = slice(1, None), slice(None, -1)
            np.maximum(grown[tuple(head)], previous[tuple(tail)], out=grown[tuple(head)])
            np.maximum(grown[tuple(tail)], previous[tuple(head)], out=grown[tuple(tail)])
    return np.where(labels > 0, labels, grown)


def _soft_stats(labels: np.ndarray, grown: np.ndarray, cover: np.ndarray, count: int) -> dict:
    """Coverage-weighted mass, centroid (x, y), skew E[v^3] / E[v^2]^1.5 and cornerness E[u^2 v^2] / (E[u^2] E[v^2])
    (u, v: offsets right and down from the centroid) of each grown label 1..count."""
    where = np.flatnonzero(grown)
    label = grown.reshape(-1)[where] - 1
    weight = cover.reshape(-1)[where].astype(np.float64)
    _, row, col = _pixel_coordinates(where, labels.shape)
    mass = np.bincount(label, weight, minlength=count)
    safe = np.maximum(mass, 1e-9)

    def mean(values):
        return np.bincount(label, weight * values, minlength=count) / safe

    x, y = mean(col + 0.5), mean(row + 0.5)
    u, v = col + 0.5 - x[label], row + 0.5 - y[label]
    uu, vv = u * u, v * v
    u2, v2 = np.maximum(mean(uu), 1e-9), np.maximum(mean(vv), 1e-9)
    return {"mass": mass, "x": x, "y": y, "skew": mean(vv * v) / v2**1.5, "cornerness": mean(uu * vv) / (u2 * v2)}


def _split_blob(crop_labels: np.ndarray, label: int, new_label: int, radius: float) -> int:
    """Split blob `label` in place if it holds two touching objects; returns the next free label.

    Seeds are centres of largest inscribed discs (peaks of the distance transform): the two far ends of the deepest
    ridge when two equally deep objects fused along it (two squares side by side), else the deepest point and the
    deepest point outside its disc. Each pixel goes to the seed minimising distance - inscribed radius, which cuts
    touching shapes of different sizes at their contact rather than at the midpoint of their centres.
    """
    inside = crop_labels == label
    depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    ridge = np.argwhere(depth >= depth.max() - 1)
    gaps = np.linalg.norm(ridge[:, None] - ridge[None], axis=-1)
    ends = np.unravel_index(gaps.argmax(), gaps.shape)
    long_ridge = gaps[ends] >= 1.5 * radius  # two equally deep objects fused along it (two squares: about 2r)
    first = tuple(ridge[ends[0]]) if long_ridge else np.unravel_index(depth.argmax(), depth.shape)
    rows, cols = np.indices(inside.shape)
    from_first = np.hypot(rows - first[0], cols - first[1])
    outside_first_disc = np.where(from_first > depth[first] + 1, depth, 0)
    second = tuple(ridge[ends[1]]) if long_ridge else np.unravel_index(outside_first_disc.argmax(), depth.shape)
    if depth[second] < MIN_SECOND_CORE_PER_R * radius:
        return new_label
    from_second = np.hypot(rows - second[0], cols - second[1])
    crop_labels[inside & (from_second - depth[second] < from_first - depth[first])] = new_label
    return new_label + 1
