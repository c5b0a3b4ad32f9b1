"""Score images against what their captions ask for, with the paper's per-image metrics, for a whole batch at once.

Per image (bool), as the paper defines them: color (each named colour is present), shape (each named shape is
present), exist_binding (an object of (colour1, shape1) and one of (colour2, shape2) exist), unique_binding (exactly
one object matches each description), spatial_relationship (strict: the 8-way rule of scenes.relation_index on the
two bound objects' centres equals the caption's) and spatial_relationship_loose (only the signs of dx, dy the relation
names, each beyond the paper's margin of 5 px at 128 px), both scored only when the binding is unique (so relation <=
unique binding); overall = colour & shape & unique binding & strict relation, overall_loose the same with the loose
relation. Beside them, spatial_relationship_ungated is the relation of the first objects that match each description
even when more match (this project's earlier metric). A colour left out of the caption (None) matches any colour.
The paper's table reports the loose relation in its "Spatial Relation" column (most likely; its code computes both).

When both objects can match the same description ("circle above red circle"), the more specific one is bound first;
when they are described identically ("red circle above red circle"), either order may satisfy the relation.
"""

import numpy as np

from relcirc_jax.data.scenes import direct_threshold, relation_index
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec
from relcirc_jax.evaluation.detector import Detections, check_images, detect

METRICS = (
    "color",
    "shape",
    "exist_binding",
    "unique_binding",
    "spatial_relationship",
    "spatial_relationship_loose",
    "overall",
    "overall_loose",
    "spatial_relationship_ungated",
)
# The columns of the paper's main table (DESIGN §1 headline numbers) and the metric each corresponds to here.
PAPER_COLUMNS = {
    "Color": "color",
    "Shape": "shape",
    "Unique Binding": "unique_binding",
    "Spatial Relation": "spatial_relationship_loose",
}
# Sign of (dx, dy) each relation asks for in the loose test; 0 = unconstrained.
_LOOSE_SIGNS = np.array(
    [
        {
            "above": (0, -1),
            "below": (0, 1),
            "left": (-1, 0),
            "right": (1, 0),
            "upper_left": (-1, -1),
            "upper_right": (1, -1),
            "lower_left": (-1, 1),
            "lower_right": (1, 1),
        }[r]
        for r in RELATIONS
    ]
)


DETECTORS = ("relcirc", "paper")


def detect_with(detector: str, images_uint8: np.ndarray, *, radius: float | None = None) -> Detections:
    """The objects found by `detector`: "relcirc" (detector.py, this project's; radius None -> size * 8 / 64) or
    "paper" (paper_detector.py, the paper's OpenCV contour detector re-implemented; it ignores radius)."""
    if detector == "relcirc":
        return detect(images_uint8, radius=radius)
    if detector == "paper":
        from relcirc_jax.evaluation import paper_detector  # OpenCV is only loaded when asked for

        return paper_detector.detect(images_uint8)
    raise ValueError(f"Unknown detector {detector!r}; choose one of {DETECTORS}")


def score(
    images_uint8: np.ndarray, captions: list[str], *, radius: float | None = None, detector: str = "relcirc"
) -> dict[str, np.ndarray]:
    """score_specs on the scenes the captions describe (parsed with relcirc_jax.data.prompts.parse)."""
    from relcirc_jax.data.prompts import parse  # the caption grammar is optional for spec-level scoring

    return score_specs(images_uint8, [parse(c).spec for c in captions], radius=radius, detector=detector)


def score_specs(
    images_uint8: np.ndarray, specs: list[SceneSpec], *, radius: float | None = None, detector: str = "relcirc"
) -> dict[str, np.ndarray]:
    """Metrics per image: bool[N] for each name in METRICS, and centers float[N, 4] = (x1, y1, x2, y2) of the
    bound objects (NaN where an object was not found)."""
    images = check_images(images_uint8)
    if len(specs) != len(images):
        raise ValueError(f"got {len(images)} images but {len(specs)} specs/captions; pass one per image")
    return score_detections(detect_with(detector, images, radius=radius), encode_specs(specs), size=images.shape[1])


def encode_specs(specs: list[SceneSpec]) -> dict[str, np.ndarray]:
    """SceneSpecs -> index arrays (colour -1 for None); raises on unknown names."""

    def index(names, value, what):
        if value is None and what == "color":
            return -1
        if value not in names:
            raise ValueError(f"unknown {what} {value!r} in a SceneSpec; expected one of {names}")
        return names.index(value)

    fields = {"shape1": SHAPES, "color1": COLORS, "relation": RELATIONS, "shape2": SHAPES, "color2": COLORS}
    return {
        field: np.array([index(names, getattr(SceneSpec(*s), field), field.rstrip("12")) for s in specs], np.int64)
        for field, names in fields.items()
    }


def _objects_per_image(det: Detections, n: int) -> dict[str, np.ndarray]:
    """The detections as [n, most objects in an image] arrays, largest first, with a `valid` mask: every object
    counts, as in the paper's code (a cap would let noise blobs push the captioned objects out)."""
    order = np.lexsort((-det.area, det.image))
    image = det.image[order]
    rank = np.arange(len(order)) - np.searchsorted(image, image)
    width = max(1, int(np.bincount(image, minlength=n).max(initial=0)))
    out = {"valid": np.zeros((n, width), bool)}
    out["valid"][image, rank] = True
    for name in ("color", "shape", "x", "y"):
        out[name] = np.zeros((n, width), getattr(det, name).dtype)
        out[name][image, rank] = getattr(det, name)[order]
    return out


def _first(mask: np.ndarray) -> np.ndarray:
    """Index of the first True per row, -1 if none."""
    return np.where(mask.any(1), mask.argmax(1), -1)


def score_detections(det: Detections, wanted: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """The metrics from detections and encoded specs (see encode_specs)."""
    n = len(wanted["relation"])
    obj = _objects_per_image(det, n)
    valid = obj["valid"]

    def matches(shape, color):
        return valid & (obj["shape"] == shape[:, None]) & ((color[:, None] < 0) | (obj["color"] == color[:, None]))

    def has(field, value):
        return (valid & (obj[field] == value[:, None])).any(1)

    c1, c2, s1, s2 = wanted["color1"], wanted["color2"], wanted["shape1"], wanted["shape2"]
    m1, m2 = matches(s1, c1), matches(s2, c2)
    exist = m1.any(1) & m2.any(1)
    can_share = (s1 == s2) & ((c1 < 0) | (c2 < 0) | (c1 == c2))  # one object could answer both descriptions
    unique = exist & np.where(can_share, (m1 | m2).sum(1) == 2, (m1.sum(1) == 1) & (m2.sum(1) == 1))

    second_first = (c1 < 0) & (c2 >= 0)  # bind the more specific description first
    first_mask = np.where(second_first[:, None], m2, m1)
    pick_a = _first(first_mask)
    other = np.where(second_first[:, None], m1, m2) & (np.arange(valid.shape[1]) != pick_a[:, None])
    pick_b = _first(other)
    pick1, pick2 = np.where(second_first, pick_b, pick_a), np.where(second_first, pick_a, pick_b)
    found = (pick1 >= 0) & (pick2 >= 0)

    rows = np.arange(n)
    centers = np.full((n, 4), np.nan)
    for slot, pick in ((0, pick1), (1, pick2)):
        ok = pick >= 0
        centers[ok, 2 * slot] = obj["x"][rows[ok], pick[ok]]
        centers[ok, 2 * slot + 1] = obj["y"][rows[ok], pick[ok]]
    xy = np.nan_to_num(centers).reshape(n, 2, 2)
    relation = wanted["relation"]
    same_description = (s1 == s2) & (c1 == c2)
    ungated = found & (
        (relation_index(xy, size=size) == relation)
        | (same_description & (relation_index(xy[:, ::-1], size=size) == relation))
    )
    signs, margin = _LOOSE_SIGNS[relation], direct_threshold(size)

    def loose_holds(delta):
        return np.all((signs == 0) | (signs * delta > margin), axis=1)

    loose = unique & (loose_holds(xy[:, 0] - xy[:, 1]) | (same_description & loose_holds(xy[:, 1] - xy[:, 0])))
    spatial = unique & ungated

    color = ((c1 < 0) | has("color", c1)) & ((c2 < 0) | has("color", c2))
    shape = has("shape", s1) & has("shape", s2)
    parts = color & shape & unique
    return {
        "color": color,
        "shape": shape,
        "exist_binding": exist,
        "unique_binding": unique,
        "spatial_relationship": spatial,
        "spatial_relationship_loose": loose,
        "overall": parts & spatial,
        "overall_loose": parts & loose,
        "spatial_relationship_ungated": ungated,
        "centers": centers,
    }
