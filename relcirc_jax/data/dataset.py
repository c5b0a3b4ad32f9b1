"""Deterministic training batches of relation scenes (per process slice) and the fixed, versioned eval prompt sets.

Tasks (what a scene is):
  "paper":    the paper's data (Wang et al. 2026): two different shapes, one red and one blue object (which one is
              named first is random), centres uniform in [r+1, size-r-1]^2 with no overlap rejection, and the relation
              derived from the centres (scenes.relation_index), so diagonals are far more frequent than straight ones.
  "balanced": shapes and colours drawn independently (two red circles happen), the relation drawn uniformly and the
              layout sampled for it, layouts overlapping more than 5 % rejected (scenes.sample_centers).

Relation draws (how a scene's relation comes about; default: the task's own, "scene" for "paper", "uniform" for
"balanced"):
  "scene":   the centres are drawn (uniformly; "balanced" rejects overlaps) and the relation read off them, so the four
             straight relations, which need |dx| or |dy| within scenes.direct_threshold, are 4-5x rarer than diagonals
             (paper task at 32 or 64 px: each straight relation ~5 % of the scenes, each diagonal ~20 %).
  "uniform": the relation is drawn uniformly, as the eval prompt sets hold them, and the centres uniformly given it
             (the task's overlap rule kept: scenes.sample_centers). For "paper" a departure from its training data.
  "straight_heavy": as "uniform", but each straight relation twice as often as each diagonal (1/6 vs 1/12 of the
             scenes): the straight relations, which the strict test holds to a pixel, are the ones models learn last.

Caption mixes (how a scene is worded; default: the task's own, "paper" or "train"):
  "paper":     phrasing uniform over the relation's phrasings; each colour word kept with probability 0.5,
               independently; the "plain" template (prompts.TEMPLATES).
  "train":     phrasing canonical with probability 0.6, else uniform over the others; with probability 0.2 colours
               are left out (object 1's, object 2's, or both, 1/3 each); never filler words.
  "canonical": canonical phrasing, both colours, no filler.
  "with_filler": "train" plus "the" before both objects on half the captions, to train filler-robust models.

Determinism: with num_scenes None every step draws fresh scenes: the global batch at (seed, step) is cut into chunks
of CHUNK examples and chunk k is drawn from its own generator seeded with (seed, step, k). With num_scenes N the
scenes (and their captions) are a fixed set drawn once from (seed, chunk), and the training stream walks through it
in epochs, each in its own permutation of (seed, epoch): example i of step s is position s * global_batch + i of that
stream. Either way an example is a pure function of (seed, step, i), so any process_count sees the same global batch
and a resumed run sees the same data. A process draws only what its slice needs and renders only its slice.
"""

import functools
import itertools
from typing import NamedTuple

import numpy as np

from relcirc_jax.data import prompts, scenes, tokenizer
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec

CHUNK = 256  # part of the data definition: changing it changes every batch
EVAL_SET_VERSION = 2
TASKS = ("paper", "balanced")
_FIXED_SET_STREAM = 0x5CE7E5  # extra seed word: the fixed set's generators never coincide with a fresh step's
_EPOCH_STREAM = 0xE90C


class CaptionMix(NamedTuple):
    """How a caption is worded, given its scene."""

    p_canonical: float | None  # probability of phrasing 0, else uniform over the others; None = uniform over all
    drop_colors: tuple[float, float, float, float]  # probabilities of leaving out no colour, colour 1, 2, both
    p_filler: float  # probability of the "the_both" template instead of "plain"


CAPTION_MIXES = {
    "paper": CaptionMix(p_canonical=None, drop_colors=(0.25, 0.25, 0.25, 0.25), p_filler=0.0),
    "train": CaptionMix(p_canonical=0.6, drop_colors=(0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3), p_filler=0.0),
    "canonical": CaptionMix(p_canonical=1.0, drop_colors=(1.0, 0.0, 0.0, 0.0), p_filler=0.0),
    "with_filler": CaptionMix(p_canonical=0.6, drop_colors=(0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3), p_filler=0.5),
}
TASK_CAPTION_MIX = {"paper": "paper", "balanced": "train"}
RELATION_DRAWS = ("scene", "uniform", "straight_heavy")
# P(relation) of "straight_heavy", in RELATIONS order (the four straight relations first).
_STRAIGHT_HEAVY_P = np.array([2, 2, 2, 2, 1, 1, 1, 1]) / 12
TASK_RELATION_DRAW = {"paper": "scene", "balanced": "uniform"}
_NUM_PHRASINGS = np.array([len(prompts.PHRASINGS[r]) for r in RELATIONS])
_NO_COLOR = len(COLORS)  # colour index meaning "left out of the caption"
_WORDING_TEMPLATES = ("plain", "the_both")


@functools.lru_cache(maxsize=None)
def _caption_lookup() -> np.ndarray:
    """int32[template, relation, phrasing, color1, shape1, color2, shape2] -> caption index (-1 = no such phrasing);
    template 0 is "plain", 1 "the_both"."""
    colors = COLORS + (None,)
    lookup = np.full(
        (
            len(_WORDING_TEMPLATES),
            len(RELATIONS),
            _NUM_PHRASINGS.max(),
            len(colors),
            len(SHAPES),
            len(colors),
            len(SHAPES),
        ),
        -1,
        np.int32,
    )
    for f, r, p, c1, s1, c2, s2 in itertools.product(
        range(len(_WORDING_TEMPLATES)),
        range(len(RELATIONS)),
        range(_NUM_PHRASINGS.max()),
        range(len(colors)),
        range(len(SHAPES)),
        range(len(colors)),
        range(len(SHAPES)),
    ):
        if p < _NUM_PHRASINGS[r]:
            spec = SceneSpec(SHAPES[s1], colors[c1], RELATIONS[r], SHAPES[s2], colors[c2])
            text = prompts.caption(spec, phrasing=p, template=_WORDING_TEMPLATES[f])
            lookup[f, r, p, c1, s1, c2, s2] = prompts.caption_index(text)
    return lookup


def _draw_scenes(
    rng: np.random.Generator, n: int, task: str, size: int, radius: int, relations: str
) -> dict[str, np.ndarray]:
    """n scenes of `task` with relations drawn by `relations`: shape_idx, color_idx [n, 2], relation [n], centers
    [n, 2, 2]."""
    if task == "paper":
        first = rng.integers(0, len(SHAPES), n)
        shape_idx = np.stack([first, (first + rng.integers(1, len(SHAPES), n)) % len(SHAPES)], axis=1)
        red_first = rng.integers(0, 2, n)
        color_idx = np.stack([1 - red_first, red_first], axis=1)  # COLORS = (red, blue): one of each
        max_overlap = None
    else:
        shape_idx = rng.integers(0, len(SHAPES), (n, 2))
        color_idx = rng.integers(0, len(COLORS), (n, 2))
        max_overlap = scenes.MAX_OVERLAP_FRACTION
    relation = None  # "scene"
    if relations == "uniform":
        relation = rng.integers(0, len(RELATIONS), n)
    elif relations == "straight_heavy":
        relation = rng.choice(len(RELATIONS), n, p=_STRAIGHT_HEAVY_P)
    centers = scenes.sample_centers(
        rng, shape_idx, size=size, radius=radius, relation_idx=relation, max_overlap=max_overlap
    )
    if relation is None:  # "scene": read off the centres
        relation = scenes.relation_index(centers, size=size)
    return dict(shape_idx=shape_idx, color_idx=color_idx, relation=relation, centers=centers)


def _draw_caption_index(rng: np.random.Generator, drawn: dict[str, np.ndarray], mix: CaptionMix) -> np.ndarray:
    """The caption of each scene, worded by `mix`, as an index into prompts.all_captions()."""
    relation, n = drawn["relation"], len(drawn["relation"])
    if mix.p_canonical is None:
        phrasing = np.floor(rng.random(n) * _NUM_PHRASINGS[relation]).astype(np.int64)
    else:
        other_phrasing = 1 + np.floor(rng.random(n) * (_NUM_PHRASINGS[relation] - 1)).astype(np.int64)
        phrasing = np.where(rng.random(n) < mix.p_canonical, 0, other_phrasing)
    drop = rng.choice(4, size=n, p=mix.drop_colors)  # bit 0: colour 1 left out, bit 1: colour 2
    caption_colors = np.where(np.stack([drop & 1, drop & 2], axis=1) > 0, _NO_COLOR, drawn["color_idx"])
    filler = (rng.random(n) < mix.p_filler).astype(np.int64)
    shape_idx = drawn["shape_idx"]
    return _caption_lookup()[
        filler, relation, phrasing, caption_colors[:, 0], shape_idx[:, 0], caption_colors[:, 1], shape_idx[:, 1]
    ]


def _draw_chunk(
    rng: np.random.Generator, task: str, mix: CaptionMix, size: int, radius: int, relations: str
) -> dict[str, np.ndarray]:
    drawn = _draw_scenes(rng, CHUNK, task, size, radius, relations)
    drawn["caption_index"] = _draw_caption_index(rng, drawn, mix)
    return drawn


def _concat_rows(chunks: list[dict], offset: int, count: int) -> dict[str, np.ndarray]:
    return {key: np.concatenate([c[key] for c in chunks])[offset : offset + count] for key in chunks[0]}


@functools.lru_cache(maxsize=4)
def _fixed_set(
    seed: int, num_scenes: int, task: str, mix: str, size: int, radius: int, relations: str
) -> dict[str, np.ndarray]:
    """The fixed scene set: scene j is row j % CHUNK of chunk j // CHUNK, drawn from (seed, chunk)."""
    chunks = [
        _draw_chunk(
            np.random.default_rng([seed, _FIXED_SET_STREAM, k]), task, CAPTION_MIXES[mix], size, radius, relations
        )
        for k in range((num_scenes - 1) // CHUNK + 1)
    ]
    fixed = _concat_rows(chunks, 0, num_scenes)
    for array in fixed.values():
        array.flags.writeable = False
    return fixed


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, num_scenes: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(num_scenes)


def _fixed_rows(seed: int, num_scenes: int, start: int, stop: int) -> np.ndarray:
    """Scene indices of stream positions [start, stop)."""
    positions = np.arange(start, stop)
    epochs, within = np.divmod(positions, num_scenes)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        rows[at] = _epoch_order(seed, num_scenes, int(epoch))[within[at]]
    return rows


def _check_args(
    seed, step, global_batch, process_index, process_count, task, caption_mix, relations, num_scenes
) -> None:
    if seed < 0 or step < 0:
        raise ValueError(f"seed ({seed}) and step ({step}) must be non-negative integers")
    if global_batch <= 0 or process_count <= 0 or global_batch % process_count:
        raise ValueError(
            f"global_batch ({global_batch}) must be a positive multiple of process_count ({process_count}); "
            "pick a global batch divisible by the number of processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in [0, process_count={process_count})")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}")
    if caption_mix is not None and caption_mix not in CAPTION_MIXES:
        raise ValueError(
            f"Unknown caption_mix {caption_mix!r}; choose one of {sorted(CAPTION_MIXES)} or None for the task's own"
        )
    if relations is not None and relations not in RELATION_DRAWS:
        raise ValueError(f"Unknown relations {relations!r}; choose one of {RELATION_DRAWS} or None for the task's own")
    if num_scenes is not None and num_scenes < 1:
        raise ValueError(f"num_scenes ({num_scenes}) must be >= 1, or None for fresh scenes every step")


def train_batch(
    seed: int,
    step: int,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    size: int = 64,
    radius: int = 8,
    task: str = "paper",
    caption_mix: str | None = None,
    relations: str | None = None,
    num_scenes: int | None = None,
) -> dict[str, np.ndarray]:
    """This process's slice (global_batch // process_count examples) of the global batch at (seed, step).

    Keys: image float32[b,size,size,3] in [-1,1]; ids int32[b,20]; mask bool[b,20]; roles int8[b,20];
    caption_index int32[b] (into prompts.all_captions()); shape_idx, color_idx int32[b,2]; relation int32[b];
    centers float32[b,2,2] ((x, y) of object 1 and object 2).
    """
    _check_args(seed, step, global_batch, process_index, process_count, task, caption_mix, relations, num_scenes)
    mix = TASK_CAPTION_MIX[task] if caption_mix is None else caption_mix
    relations = TASK_RELATION_DRAW[task] if relations is None else relations
    per_process = global_batch // process_count
    start, stop = process_index * per_process, (process_index + 1) * per_process
    if num_scenes is None:
        chunks = [
            _draw_chunk(np.random.default_rng([seed, step, k]), task, CAPTION_MIXES[mix], size, radius, relations)
            for k in range(start // CHUNK, (stop - 1) // CHUNK + 1)
        ]
        drawn = _concat_rows(chunks, start - (start // CHUNK) * CHUNK, per_process)
    else:
        fixed = _fixed_set(seed, num_scenes, task, mix, size, radius, relations)
        rows = _fixed_rows(seed, num_scenes, step * global_batch + start, step * global_batch + stop)
        drawn = {key: value[rows] for key, value in fixed.items()}
    ids, mask, roles = tokenizer.caption_tables()
    image = scenes.render(drawn["shape_idx"], drawn["color_idx"], drawn["centers"], size=size, radius=radius)
    image = image.astype(np.float32)
    image *= 1 / 127.5
    image -= 1.0
    return dict(
        image=image,
        ids=ids[drawn["caption_index"]],
        mask=mask[drawn["caption_index"]],
        roles=roles[drawn["caption_index"]],
        caption_index=drawn["caption_index"].astype(np.int32),
        shape_idx=drawn["shape_idx"].astype(np.int32),
        color_idx=drawn["color_idx"].astype(np.int32),
        relation=drawn["relation"].astype(np.int32),
        centers=drawn["centers"].astype(np.float32),
    )


def _full_color_specs() -> list[SceneSpec]:
    return [
        SceneSpec(s1, c1, relation, s2, c2)
        for relation in RELATIONS
        for c1, s1, c2, s2 in itertools.product(COLORS, SHAPES, COLORS, SHAPES)
    ]


def _paper_specs() -> list[SceneSpec]:
    """The paper's evaluation scenes, in its order: one red and one blue object (either first), two different
    shapes, in the order square, triangle, circle."""
    shapes = ("square", "triangle", "circle")
    return [
        SceneSpec(s1, c1, relation, s2, c2)
        for c1, c2 in itertools.permutations(COLORS, 2)
        for s1, s2 in itertools.permutations(shapes, 2)
        for relation in RELATIONS
    ]


def _paper_main_caption(spec: SceneSpec) -> str:
    """'{c1} {s1} is {rel} the {c2} {s2}' with the paper's phrasings: 'above', 'to the left of', and for diagonals
    'above and to the left of' (phrasing 1 of the diagonals)."""
    return prompts.caption(spec, phrasing=1 if "_" in spec.relation else 0, template="the2")


# The paper's robustness templates, in its order (generalization_profile_eval_cli's defaults).
PAPER_ROBUSTNESS_TEMPLATES = ("plain", "no_is", "no_is_the2", "the2", "the_both", "reversed")

EVAL_SETS = {
    # the paper's main table and learning curves: 96 prompts (2 colour orders x 6 shape pairs x 8 relations)
    "paper_main": lambda: [_paper_main_caption(s) for s in _paper_specs()],
    # the paper's robustness study: 6 templates x 264 prompts (2 colour orders x 6 shape pairs x 22 phrasings)
    "paper_robustness": lambda: [
        prompts.caption(spec, phrasing=p, template=template)
        for template in PAPER_ROBUSTNESS_TEMPLATES
        for spec in _paper_specs()
        for p in range(len(prompts.PHRASINGS[spec.relation]))
    ],
    # every (color1, shape1, relation, color2, shape2) with the canonical phrasing: 2*3*8*2*3 = 288
    "all_combinations": lambda: [prompts.caption(s) for s in _full_color_specs()],
    # the same combinations with each non-canonical phrasing
    "phrasing": lambda: [
        prompts.caption(s, phrasing=p)
        for s in _full_color_specs()
        for p in range(1, len(prompts.PHRASINGS[s.relation]))
    ],
    # the canonical captions with filler words ("the red square is above the blue circle")
    "filler": lambda: [prompts.caption(s, template="the_both") for s in _full_color_specs()],
}


def eval_prompts(name: str = "paper_main") -> list[str]:
    """A fixed evaluation prompt set (EVAL_SET_VERSION); ValueError for an unknown name."""
    if name not in EVAL_SETS:
        raise ValueError(f"Unknown eval prompt set {name!r}; choose one of {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]()
