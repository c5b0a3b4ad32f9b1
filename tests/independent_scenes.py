"""An independent scene renderer for checking the evaluator: PIL, not relcirc_jax.data.scenes.

Each scene: gray (128, 128, 128) canvas, one red and one blue object of two different shapes, drawn with
PIL.ImageDraw on a 4x supersampled canvas and downsampled (LANCZOS for even scenes, BOX for odd ones). Each object's
radius is the nominal size * 8 / 64 times its own factor in [1 - jitter, 1 + jitter]; a circle has that radius, a
square side 2r, a triangle points up with width 2r (height sqrt(3) r). A triangle's anchor (the sampled point) is
either its centroid or its bounding-box centre. The ground truth is the evaluator's convention: the relation of the
two objects' bounding-box centres, here measured exactly on the supersampled drawing (the extent of the pixels PIL
filled), under the project's rule relcirc_jax.data.scenes.relation_index.

"Degraded" copies get this module's own damage: Gaussian blur (PIL, sigma size / 64), a per-image per-channel
colour cast (x U(0.9, 1.1)) and additive Gaussian noise (sigma 0.05 * 255).

Used by tests/test_evaluator_independent.py and benchmarks/bench_eval.py (robustness_report).
"""

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from relcirc_jax.data.scenes import direct_threshold, relation_index
from relcirc_jax.data.spec import COLOR_RGB, COLORS, RELATIONS, SHAPES, SceneSpec
from relcirc_jax.evaluation import score_specs

SUPERSAMPLE = 4
JITTER = 0.2  # each object's radius is nominal * U(1 - JITTER, 1 + JITTER)
ANCHORS = ("centroid", "bbox")
WRONG_KINDS = ("colors", "shape", "relation")
OPPOSITE = {
    "above": "below",
    "below": "above",
    "left": "right",
    "right": "left",
    "upper_left": "lower_right",
    "lower_right": "upper_left",
    "upper_right": "lower_left",
    "lower_left": "upper_right",
}
NOISE_SIGMA = 0.05 * 255
MAX_CAST = 0.1
_SQRT3 = np.sqrt(3.0)


def _outline(shape: str, x: float, y: float, r: float, anchor: str) -> tuple[np.ndarray, bool]:
    """Vertices [k, 2] in output px of the shape anchored at (x, y) (a circle: its bounding box), and is_ellipse."""
    if shape == "circle":
        return np.array([[x - r, y - r], [x + r, y + r]]), True
    if shape == "square":
        return np.array([[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]]), False
    h = _SQRT3 * r
    top = y - (2 * h / 3 if anchor == "centroid" else h / 2)  # the centroid sits 2h/3 below the apex
    return np.array([[x, top], [x + r, top + h], [x - r, top + h]]), False


def _extent(shape: str, x: float, y: float, r: float, anchor: str) -> np.ndarray:
    """Nominal bounding box (left, top, right, bottom) in output px."""
    vertices, _ = _outline(shape, x, y, r, anchor)
    return np.concatenate([vertices.min(0), vertices.max(0)])


def sample_layouts(rng: np.random.Generator, n: int, *, size: int, jitter: float = JITTER, anchor: str = "bbox"):
    """n layouts: shapes int[n, 2] (two different), colours int[n, 2] (one red, one blue), anchors float[n, 2, 2]
    (object, xy) and radii float[n, 2].

    Anchors are uniform in [r + 1, size - r - 1] for each object's own r. Rejected and redrawn: layouts whose
    bounding boxes intersect (the evaluator cannot see an occluded object, so the true caption would be unscorable)
    and the few centroid-anchored triangles whose apex would come closer than 1 px to the top edge (their anchor
    range is the others', but the apex reaches 2h/3 = 1.15 r above it)."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    nominal = size * 8 / 64
    shapes = np.zeros((n, 2), np.int64)
    colors = np.zeros((n, 2), np.int64)
    anchors = np.zeros((n, 2, 2))
    radii = np.zeros((n, 2))
    done = 0
    while done < n:
        shape = rng.permutation(len(SHAPES))[:2]
        color = rng.permutation(len(COLORS))
        r = nominal * rng.uniform(1 - jitter, 1 + jitter, 2)
        xy = rng.uniform(r[:, None] + 1, size - r[:, None] - 1, (2, 2))
        boxes = [_extent(SHAPES[s], *p, rr, anchor) for s, p, rr in zip(shape, xy, r)]
        inside = all(b[:2].min() >= 1 and b[2:].max() <= size - 1 for b in boxes)
        apart = (
            boxes[0][2] <= boxes[1][0]
            or boxes[1][2] <= boxes[0][0]
            or boxes[0][3] <= boxes[1][1]
            or boxes[1][3] <= boxes[0][1]
        )
        if inside and apart:
            shapes[done], colors[done], anchors[done], radii[done] = shape, color, xy, r
            done += 1
    return shapes, colors, anchors, radii


def render(shapes, colors, anchors, radii, *, size: int, anchor: str = "bbox"):
    """uint8[n, size, size, 3] images and the objects' bounding-box centres float[n, 2, 2] (object, xy), measured on
    the supersampled drawing: superpixel k covers [k, k + 1) / SUPERSAMPLE output px."""
    n = len(shapes)
    big = size * SUPERSAMPLE
    images = np.empty((n, size, size, 3), np.uint8)
    centers = np.zeros((n, 2, 2))
    for i in range(n):
        canvas = Image.new("RGB", (big, big), (128, 128, 128))
        draw = ImageDraw.Draw(canvas)
        corners = []
        for k in range(2):
            vertices, ellipse = _outline(SHAPES[shapes[i, k]], *anchors[i, k], radii[i, k], anchor)
            # PIL fills whole superpixels and truncates float coordinates: pass the integer superpixel indices.
            points = np.rint(vertices * SUPERSAMPLE - 0.5).astype(int)
            (draw.ellipse if ellipse else draw.polygon)(
                [tuple(p) for p in points.tolist()], fill=COLOR_RGB[COLORS[colors[i, k]]]
            )
            corners.append(np.concatenate([points.min(0) - 2, points.max(0) + 3]))
        for k, (left, top, right, bottom) in enumerate(corners):  # the filled superpixels, near the vertices
            patch = np.asarray(canvas.crop((left, top, right, bottom)))
            drawn = np.all(patch == COLOR_RGB[COLORS[colors[i, k]]], axis=-1)
            rows, cols = np.flatnonzero(drawn.any(1)) + top, np.flatnonzero(drawn.any(0)) + left
            centers[i, k] = (cols[0] + cols[-1] + 1) / 2 / SUPERSAMPLE, (rows[0] + rows[-1] + 1) / 2 / SUPERSAMPLE
        resample = Image.LANCZOS if i % 2 == 0 else Image.BOX
        images[i] = np.asarray(canvas.resize((size, size), resample))
    return images, centers


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma size / 64), per-channel colour cast and additive Gaussian noise; uint8 in, uint8 out."""
    n, size = len(images), images.shape[1]
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(size / 64))) for im in images])
    x = blurred.astype(np.float32) * rng.uniform(1 - MAX_CAST, 1 + MAX_CAST, (n, 1, 1, 3)).astype(np.float32)
    x += NOISE_SIGMA * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def true_specs(shapes, colors, centers, *, size: int) -> list[SceneSpec]:
    """The caption each scene truly shows: object 1 relative to object 2, relation from bounding-box centres."""
    relation = relation_index(centers, size=size)
    return [
        SceneSpec(SHAPES[s1], COLORS[c1], RELATIONS[rel], SHAPES[s2], COLORS[c2])
        for (s1, s2), (c1, c2), rel in zip(shapes, colors, relation)
    ]


def wrong_spec(rng: np.random.Generator, spec: SceneSpec, kind: str) -> SceneSpec:
    """A false caption: colours swapped, one object's shape replaced by another shape, or the opposite relation."""
    if kind == "colors":
        return spec._replace(color1=spec.color2, color2=spec.color1)
    if kind == "shape":
        which = "shape1" if rng.random() < 0.5 else "shape2"
        return spec._replace(**{which: str(rng.choice([s for s in SHAPES if s != getattr(spec, which)]))})
    if kind == "relation":
        return spec._replace(relation=OPPOSITE[spec.relation])
    raise ValueError(f"unknown wrong-caption kind {kind!r}; use one of {WRONG_KINDS}")


def threshold_gap(centers: np.ndarray, *, size: int) -> np.ndarray:
    """float[n]: how far (px) each layout's |dx| and |dy| are from the relation threshold (the smaller)."""
    delta = np.abs(centers[:, 0] - centers[:, 1])
    return np.abs(delta - direct_threshold(size)).min(1)


@functools.lru_cache(maxsize=8)
def _clean_scenes(seed: int, n: int, size: int, anchor: str, jitter: float):
    rng = np.random.default_rng([seed, size, ANCHORS.index(anchor)])
    shapes, colors, anchors, radii = sample_layouts(rng, n, size=size, jitter=jitter, anchor=anchor)
    images, centers = render(shapes, colors, anchors, radii, size=size, anchor=anchor)
    images.flags.writeable = centers.flags.writeable = False  # shared by every caller
    return images, tuple(true_specs(shapes, colors, centers, size=size)), centers


def scenes(seed: int, n: int, *, size: int, degraded: bool, anchor: str, jitter: float = JITTER):
    """n seeded scenes: images, true specs and bounding-box centres (read-only). The clean and degraded scenes of a
    (seed, n, size, anchor) share their layouts; the clean renders are cached."""
    images, specs, centers = _clean_scenes(seed, n, size, anchor, jitter)
    if degraded:
        images = degrade(images, np.random.default_rng([seed, size, ANCHORS.index(anchor), 1]))
    return images, list(specs), centers


def robustness(seed: int, n: int, *, size: int, degraded: bool, anchor: str, jitter: float = JITTER) -> dict:
    """Percent of true captions the evaluator accepts (metric `overall`), and percent of each wrong kind."""
    images, specs, _ = scenes(seed, n, size=size, degraded=degraded, anchor=anchor, jitter=jitter)
    rng = np.random.default_rng([seed, size, int(degraded), ANCHORS.index(anchor), 2])
    out = {"correct_pct": score_specs(images, specs)["overall"].mean() * 100}
    for kind in WRONG_KINDS:
        wrong = [wrong_spec(rng, s, kind) for s in specs]
        out[f"wrong_{kind}_pct"] = score_specs(images, wrong)["overall"].mean() * 100
    return {key: round(float(value), 2) for key, value in out.items()}


def touching_pairs(rng: np.random.Generator, n: int, *, size: int, low: float = 0.75, high: float = 1.25):
    """n layouts of two red objects whose bounding boxes touch side by side (left/right or above/below, offset along
    the contact by up to half the summed radii), radii nominal * U(low, high), bounding-box anchors; half the pairs
    share a shape. Returns shapes, colours, anchors and radii as sample_layouts does. The anchors are the true
    bounding-box centres here (render's measured centres need the two objects to differ in colour)."""
    nominal = size * 8 / 64
    shapes = np.array(
        [
            np.repeat(rng.integers(len(SHAPES)), 2) if rng.random() < 0.5 else rng.permutation(len(SHAPES))[:2]
            for _ in range(n)
        ]
    )
    radii = nominal * rng.uniform(low, high, (n, 2))
    anchors = np.zeros((n, 2, 2))
    for i in range(n):
        while True:
            first = rng.uniform(radii[i, 0] + 1, size - radii[i, 0] - 1, 2)
            step = np.array([rng.choice([-1, 1]) * radii[i].sum(), rng.uniform(-0.5, 0.5) * radii[i].sum()])
            second = first + (step if rng.random() < 0.5 else step[::-1])
            if np.all(second > radii[i, 1] + 1) and np.all(second < size - radii[i, 1] - 1):
                anchors[i] = first, second
                break
    return shapes, np.zeros((n, 2), np.int64), anchors, radii


COMBOS = [(size, degraded, anchor) for size in (64, 128) for degraded in (False, True) for anchor in ANCHORS]


def robustness_report(n: int = 300, seed: int = 0, jitter: float = JITTER) -> dict[str, dict]:
    """robustness() for all 8 combos of size {64, 128} x {clean, degraded} x triangle anchor, keyed like
    '64px_clean_centroid'."""
    return {
        f"{size}px_{'degraded' if degraded else 'clean'}_{anchor}": robustness(
            seed, n, size=size, degraded=degraded, anchor=anchor, jitter=jitter
        )
        for size, degraded, anchor in COMBOS
    }
