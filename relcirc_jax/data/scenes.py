"""Two-object scenes: the relation rule, layout sampling and a vectorised numpy renderer.

Geometry (pixel (row i, column j) covers [j, j+1) x [i, i+1); image y grows downward). Every shape is centred on the
centre of its bounding box [c - r, c + r]: a circle of radius r, a square of side 2r, an equilateral triangle of width
2r pointing up (height sqrt(3) r). Edges are anti-aliased by a one-pixel ramp of the signed distance. Object 2 is drawn
on top of object 1. sample_centers places both centres uniformly, for the "balanced" task rejecting layouts whose
overlap exceeds 5 % of the smaller object's area; the paper's task lets objects overlap.
"""

import numpy as np

from relcirc_jax.data.spec import BACKGROUND_RGB, COLOR_RGB, COLORS, RELATIONS, SHAPES

MAX_OVERLAP_FRACTION = 0.05
_SQRT3 = np.sqrt(3.0)
_SHAPE_AREA_PER_R2 = {"circle": np.pi, "square": 4.0, "triangle": _SQRT3}
_COLOR_TABLE = np.array([COLOR_RGB[c] for c in COLORS], np.float32)
_MAX_SAMPLING_ROUNDS = 1000
_TRIES_PER_ROUND_FOR_A_RELATION = 16
_RGB_PIXEL = np.dtype((np.void, 3))


def direct_threshold(size: int) -> float:
    """Largest |dx| (|dy|) still counted as 'directly' above/below (left/right): the paper's 5 px at 128 px (2.5 px at
    64 px), scaled with size. The paper's evaluator uses the same value as the margin of its loose relation test."""
    return 5.0 * size / 128.0


def relation_index(centers: np.ndarray, *, size: int = 64) -> np.ndarray:
    """Index into RELATIONS of object 1 relative to object 2; centers[:, k] = (x, y) of object k+1.

    |dx| <= t -> above (dy < 0) / below; else |dy| <= t -> left (dx < 0) / right; else the diagonal of the signs.
    """
    centers = np.asarray(centers, np.float64)
    if centers.ndim != 3 or centers.shape[1:] != (2, 2):
        raise ValueError(f"centers must have shape [N, 2, 2] (object, xy), got {centers.shape}")
    dx = centers[:, 0, 0] - centers[:, 1, 0]
    dy = centers[:, 0, 1] - centers[:, 1, 1]
    t = direct_threshold(size)
    up, leftward = dy < 0, dx < 0
    diagonal = 4 + 2 * (~up) + (~leftward)  # upper_left, upper_right, lower_left, lower_right
    return np.where(
        np.abs(dx) <= t, np.where(up, 0, 1), np.where(np.abs(dy) <= t, np.where(leftward, 2, 3), diagonal)
    ).astype(np.int64)


def shape_area(shape_idx: np.ndarray, radius: float) -> np.ndarray:
    """Exact area of each shape at this radius."""
    per_r2 = np.array([_SHAPE_AREA_PER_R2[s] for s in SHAPES])
    return per_r2[np.asarray(shape_idx)] * float(radius) ** 2


def signed_distance(shape_idx: np.ndarray, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Distance (px) inside the boundary of shape_idx[m] at offsets (u, v)[m, ...] from its centre; < 0 outside."""
    shape_idx = np.asarray(shape_idx)
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    ndim = max(u.ndim, v.ndim, 1)
    u, v = u.reshape((1,) * (ndim - u.ndim) + u.shape), v.reshape((1,) * (ndim - v.ndim) + v.shape)
    out = np.empty(np.broadcast_shapes(u.shape, v.shape, shape_idx.shape + (1,) * (ndim - 1)), np.float32)
    r = np.float32(radius)
    for k, name in enumerate(SHAPES):
        sel = shape_idx == k
        if not sel.any():
            continue
        uu, vv = (a[sel] if a.shape[0] > 1 else a for a in (u, v))  # select rows before broadcasting
        if name == "circle":
            out[sel] = r - np.sqrt(uu * uu + vv * vv)
        elif name == "square":
            out[sel] = r - np.maximum(np.abs(uu), np.abs(vv))
        else:  # triangle: base at v = h/2, sides through the apex (0, -h/2) with inward normals (-+sqrt3/2, 1/2)
            half_h = r * _SQRT3 / 2
            sides = 0.5 * (vv + half_h) - (_SQRT3 / 2) * np.abs(uu)
            out[sel] = np.minimum(half_h - vv, sides)
    return out


def _check_objects(shape_idx, centers=None):
    """Validated (shape_idx int[N, 2], centers float32[N, 2, 2] or None); one clear ValueError otherwise."""
    shape_idx = np.asarray(shape_idx)
    if shape_idx.ndim != 2 or shape_idx.shape[1] != 2 or not np.issubdtype(shape_idx.dtype, np.integer):
        raise ValueError(f"shape_idx must be an integer array [N, 2], got {shape_idx.dtype}{list(shape_idx.shape)}")
    if shape_idx.size and (shape_idx.min() < 0 or shape_idx.max() >= len(SHAPES)):
        raise ValueError(f"shape_idx values must index SHAPES={SHAPES}")
    if centers is not None:
        centers = np.asarray(centers, np.float32)
        if centers.shape != (shape_idx.shape[0], 2, 2) or not np.isfinite(centers).all():
            raise ValueError(
                f"centers must be finite floats of shape {(shape_idx.shape[0], 2, 2)}, got {centers.shape}"
            )
    return shape_idx, centers


def overlap_fraction(shape_idx: np.ndarray, centers: np.ndarray, *, radius: float = 8) -> np.ndarray:
    """Overlap area of the two objects over the smaller object's area (0.5 px sampling grid), float[N]."""
    shape_idx, centers = _check_objects(shape_idx, centers)
    frac = np.zeros(shape_idx.shape[0])
    delta = centers[:, 1] - centers[:, 0]
    near = np.flatnonzero(np.all(np.abs(delta) < 2 * radius, axis=1))  # shapes fit in [c - r, c + r]
    if near.size == 0:
        return frac
    grid = np.arange(-radius, radius, 0.5, dtype=np.float32) + 0.25
    gu, gv = grid[None, None, :], grid[None, :, None]
    inside1 = signed_distance(shape_idx[near, 0], gu, gv, radius) >= 0
    u2 = gu - delta[near, 0, None, None]
    v2 = gv - delta[near, 1, None, None]
    inside2 = signed_distance(shape_idx[near, 1], u2, v2, radius) >= 0
    area = (inside1 & inside2).sum(axis=(1, 2)) * 0.25
    frac[near] = area / np.minimum(shape_area(shape_idx[near, 0], radius), shape_area(shape_idx[near, 1], radius))
    return frac


def sample_centers(
    rng: np.random.Generator,
    shape_idx: np.ndarray,
    *,
    size: int = 64,
    radius: float = 8,
    relation_idx: np.ndarray | None = None,
    max_overlap: float | None = MAX_OVERLAP_FRACTION,
) -> np.ndarray:
    """Centres uniform in [r+1, size-r-1]^2 per object, resampled until overlap <= max_overlap (None: no overlap test,
    the paper's task) and the relation matches relation_idx (if given).

    Rejection sampling keeps the layout distribution uniform conditioned on the relation; it loops over rounds on the
    still-rejected rows, never over images. Returns float32[N, 2, 2] = (object, xy).
    """
    shape_idx, _ = _check_objects(shape_idx)
    n = shape_idx.shape[0]
    if relation_idx is not None:
        relation_idx = np.asarray(relation_idx)
        if relation_idx.shape != (n,) or not 0 <= relation_idx.min(initial=0) <= relation_idx.max(initial=0) < len(
            RELATIONS
        ):
            raise ValueError(f"relation_idx must be ints in [0, {len(RELATIONS)}) of shape ({n},)")
    lo, hi = radius + 1, size - radius - 1
    if hi <= lo:
        raise ValueError(f"radius {radius} is too large for size {size}: need size > 2 * radius + 2")
    tries = 1 if relation_idx is None else _TRIES_PER_ROUND_FOR_A_RELATION  # a relation accepts only ~6-17 %
    centers = np.zeros((n, 2, 2), np.float32)
    todo = np.arange(n)
    for _ in range(_MAX_SAMPLING_ROUNDS):
        if todo.size == 0:
            return centers
        rows = np.repeat(todo, tries)
        candidates = rng.uniform(lo, hi, size=(rows.size, 2, 2)).astype(np.float32)
        ok = np.ones(rows.size, bool)
        if relation_idx is not None:  # the cheap test first: overlap only for candidates with the right relation
            ok = relation_index(candidates, size=size) == relation_idx[rows]
        if max_overlap is not None:
            ok[ok] = overlap_fraction(shape_idx[rows[ok]], candidates[ok], radius=radius) <= max_overlap
        ok = ok.reshape(todo.size, tries)
        placed = ok.any(axis=1)
        first_ok = ok.argmax(axis=1)  # the first acceptable candidate keeps the conditional distribution exact
        centers[todo[placed]] = candidates.reshape(todo.size, tries, 2, 2)[placed, first_ok[placed]]
        todo = todo[~placed]
    raise RuntimeError(f"could not place {todo.size} layouts in {_MAX_SAMPLING_ROUNDS} rounds; is radius too large?")


def _coverage(shape_k: np.ndarray, centers_k: np.ndarray, size: int, radius: float):
    """Anti-aliased coverage in [0, 1] of one object per image on a square patch around it, float32[N, p, p],
    plus the flat pixel index (image, row, column) of every patch pixel. The coverage ramp reaches 0.5 px past
    the boundary, so p = ceil(2r) + 2 pixels starting at floor(c - r) - 1 hold the whole object."""
    p = min(int(np.ceil(2 * radius)) + 2, size)
    origin = np.clip(np.floor(centers_k - radius).astype(np.int64) - 1, 0, size - p)
    steps = np.arange(p)
    cols = origin[:, 0, None] + steps  # [N, p]
    rows = origin[:, 1, None] + steps
    u = (cols + 0.5 - centers_k[:, 0, None])[:, None, :].astype(np.float32)
    v = (rows + 0.5 - centers_k[:, 1, None])[:, :, None].astype(np.float32)
    cover = signed_distance(shape_k, u, v, radius)
    cover += 0.5
    np.clip(cover, 0.0, 1.0, out=cover)
    flat = (np.arange(len(shape_k))[:, None, None] * size + rows[:, :, None]) * size + cols[:, None, :]
    return cover, flat


def object_masks(shape_idx: np.ndarray, centers: np.ndarray, *, size: int = 64, radius: float = 8) -> np.ndarray:
    """bool[N, 2, size, size]: the full (unoccluded) pixel mask of each object, i.e. coverage >= 0.5."""
    shape_idx, centers = _check_objects(shape_idx, centers)
    masks = np.zeros((shape_idx.shape[0], 2, size * size), bool).reshape(-1)
    for k in range(2):
        cover, flat = _coverage(shape_idx[:, k], centers[:, k], size, radius)
        image_of_pixel, pixel = np.divmod(flat, size * size)
        masks[(image_of_pixel * 2 + k) * size * size + pixel] = cover >= 0.5
    return masks.reshape(shape_idx.shape[0], 2, size, size)


def render(
    shape_idx: np.ndarray, color_idx: np.ndarray, centers: np.ndarray, *, size: int = 64, radius: float = 8
) -> np.ndarray:
    """uint8[N, size, size, 3] scenes: gray canvas, object 1, then object 2 on top."""
    shape_idx, centers = _check_objects(shape_idx, centers)
    color_idx = np.asarray(color_idx)
    if (
        color_idx.shape != shape_idx.shape
        or not np.issubdtype(color_idx.dtype, np.integer)
        or (color_idx.size and (color_idx.min() < 0 or color_idx.max() >= len(COLORS)))
    ):
        raise ValueError(f"color_idx must be integers in [0, {len(COLORS)}) of shape {shape_idx.shape}")
    n = shape_idx.shape[0]
    canvas = np.empty((n, size * size * 3), np.uint8)
    canvas[:] = np.tile(np.asarray(BACKGROUND_RGB, np.uint8), size * size)
    pixels = canvas.reshape(-1).view(_RGB_PIXEL)  # one element per pixel makes gather/scatter fast
    background = np.asarray(BACKGROUND_RGB, np.float32)
    for k in range(2):
        cover, flat = _coverage(shape_idx[:, k], centers[:, k], size, radius)
        if k == 0:  # object 1 always lands on the bare canvas
            below = np.broadcast_to(background, flat.shape + (3,))
        else:
            below = pixels[flat].view(np.uint8).reshape(flat.shape + (3,)).astype(np.float32)
        blended = _COLOR_TABLE[color_idx[:, k]][:, None, None, :] - below
        blended *= cover[..., None]
        blended += below
        blended = np.rint(blended, out=blended).astype(np.uint8)
        pixels[flat] = blended.reshape(-1).view(_RGB_PIXEL).reshape(flat.shape)
    return canvas.reshape(n, size, size, 3)
