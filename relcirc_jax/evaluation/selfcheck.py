"""Measure the evaluator on fresh renders: accuracy on true captions (clean and degraded) and false acceptance of
deliberately wrong ones. Used by tests (small seeded samples) and benchmarks/bench_eval.py (the reported figures).
"""

import numpy as np

from relcirc_jax.data import scenes
from relcirc_jax.data.spec import COLORS, CONVERSE, RELATIONS, SHAPES, SceneSpec
from relcirc_jax.evaluation.degrade import degrade
from relcirc_jax.evaluation.scoring import score_specs

WRONG_KINDS = ("relation", "colors", "shape")


def random_scenes(rng: np.random.Generator, n: int, *, size: int = 64, radius: float = 8):
    """n fresh scenes: uint8 images [n, size, size, 3] and the SceneSpec each one truly shows."""
    shape_idx = rng.integers(0, len(SHAPES), (n, 2))
    color_idx = rng.integers(0, len(COLORS), (n, 2))
    centers = scenes.sample_centers(rng, shape_idx, size=size, radius=radius)
    relation = scenes.relation_index(centers, size=size)
    specs = [
        SceneSpec(SHAPES[s1], COLORS[c1], RELATIONS[r], SHAPES[s2], COLORS[c2])
        for (s1, s2), (c1, c2), r in zip(shape_idx, color_idx, relation)
    ]
    return scenes.render(shape_idx, color_idx, centers, size=size, radius=radius), specs


def _other(rng: np.random.Generator, names: tuple, name: str) -> str:
    return str(rng.choice([other for other in names if other != name]))


def wrong_spec(rng: np.random.Generator, spec: SceneSpec, kind: str) -> SceneSpec:
    """A caption the scene does not satisfy: another relation (not the converse when both objects are described
    alike: "red circle below red circle" is as true as "red circle above red circle"); the colours swapped (object 1
    recoloured when both share a colour); or one object's shape replaced."""
    if kind == "relation":
        alike = (spec.shape1, spec.color1) == (spec.shape2, spec.color2)
        true = {spec.relation, CONVERSE[spec.relation]} if alike else {spec.relation}
        return spec._replace(relation=str(rng.choice([r for r in RELATIONS if r not in true])))
    if kind == "colors":
        if spec.color1 == spec.color2:
            return spec._replace(color1=_other(rng, COLORS, spec.color1))
        return spec._replace(color1=spec.color2, color2=spec.color1)
    if kind == "shape":
        which = "shape1" if rng.random() < 0.5 else "shape2"
        return spec._replace(**{which: _other(rng, SHAPES, getattr(spec, which))})
    raise ValueError(f"unknown wrong-caption kind {kind!r}; use one of {WRONG_KINDS}")


def accuracy_report(n: int, *, size: int = 64, radius: float | None = None, seed: int = 0) -> dict[str, float]:
    """Percent overall-correct on clean and degraded renders, and percent wrongly accepted per wrong-caption kind."""
    radius = size * 8 / 64 if radius is None else radius
    rng = np.random.default_rng(seed)
    images, specs = random_scenes(rng, n, size=size, radius=radius)
    report = {
        "clean_overall_pct": score_specs(images, specs, radius=radius)["overall"].mean() * 100,
        "degraded_overall_pct": score_specs(degrade(images, rng), specs, radius=radius)["overall"].mean() * 100,
    }
    for kind in WRONG_KINDS:
        wrong = [wrong_spec(rng, s, kind) for s in specs]
        report[f"wrong_{kind}_accepted_pct"] = score_specs(images, wrong, radius=radius)["overall"].mean() * 100
    return {key: round(float(value), 3) for key, value in report.items()}
