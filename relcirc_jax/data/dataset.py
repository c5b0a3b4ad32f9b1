"""Deterministic training batches of relation scenes (per process slice) and the fixed, versioned eval prompt sets.

Determinism: the global batch at (seed, step) is cut into chunks of CHUNK examples; chunk k is drawn from its own
generator seeded with (seed, step, k) (specs, then centres for their relations). So example i is a pure function of
(seed, step, i) (and size, radius, caption mix): any process_count sees the same global batch, and a resumed run
sees the same data. A process draws only the chunks that overlap its slice and renders only its slice.

Caption mixes (per example, after a uniform draw of shapes, colours and relation):
  "train":     phrasing canonical with probability 0.6, else uniform over the relation's other phrasings;
               with probability 0.2 colours are left out of the caption (object 1's, object 2's, or both, 1/3 each;
               the image keeps its colours); never filler words, so the "filler" eval set stays out of domain.
  "canonical": canonical phrasing, both colours, no filler (the plain captions of the paper's scenes).
  "with_filler": "train" plus filler words ("the ...") on half the captions, to train filler-robust models.
"""
import functools
import itertools
from typing import NamedTuple

import numpy as np

from relcirc_jax.data import prompts, scenes
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec
from relcirc_jax.text import tokenizer

CHUNK = 256  # part of the data definition: changing it changes every batch
EVAL_SET_VERSION = 1


class CaptionMix(NamedTuple):
    """How a caption is worded, given its scene."""

    p_canonical: float  # probability of phrasing 0; otherwise uniform over the other phrasings
    p_drop_colors: float  # probability of leaving colour words out (object 1, object 2 or both, equally likely)
    p_filler: float  # probability of "the" before both objects


CAPTION_MIXES = {
    "train": CaptionMix(p_canonical=0.6, p_drop_colors=0.2, p_filler=0.0),
    "canonical": CaptionMix(p_canonical=1.0, p_drop_colors=0.0, p_filler=0.0),
    "with_filler": CaptionMix(p_canonical=0.6, p_drop_colors=0.2, p_filler=0.5),
}
_NUM_PHRASINGS = np.array([len(prompts.PHRASINGS[r]) for r in RELATIONS])
_NO_COLOR = len(COLORS)  # colour index meaning "left out of the caption"


@functools.lru_cache(maxsize=None)
def _caption_lookup() -> np.ndarray:
    """int32[filler, relation, phrasing, color1, shape1, color2, shape2] -> caption index (-1 = no such phrasing)."""
    colors = COLORS + (None,)
    lookup = np.full((2, len(RELATIONS), _NUM_PHRASINGS.max(), len(colors), len(SHAPES), len(colors), len(SHAPES)), -1, np.int32)
    for f, r, p, c1, s1, c2, s2 in itertools.product(
        range(2), range(len(RELATIONS)), range(_NUM_PHRASINGS.max()), range(len(colors)), range(len(SHAPES)),
        range(len(colors)), range(len(SHAPES)),
    ):
        if p < _NUM_PHRASINGS[r]:
            spec = SceneSpec(SHAPES[s1], colors[c1], RELATIONS[r], SHAPES[s2], colors[c2])
            lookup[f, r, p, c1, s1, c2, s2] = prompts.caption_index(prompts.caption(spec, phrasing=p, filler=bool(f)))
    return lookup


def _draw_chunk(seed: int, step: int, chunk: int, mix: CaptionMix, size: int, radius: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, step, chunk])
    shape_idx = rng.integers(0, len(SHAPES), (CHUNK, 2))
    color_idx = rng.integers(0, len(COLORS), (CHUNK, 2))
    relation = rng.integers(0, len(RELATIONS), CHUNK)
    other_phrasing = 1 + np.floor(rng.random(CHUNK) * (_NUM_PHRASINGS[relation] - 1)).astype(np.int64)
    phrasing = np.where(rng.random(CHUNK) < mix.p_canonical, 0, other_phrasing)
    drop = np.where(rng.random(CHUNK) < mix.p_drop_colors, rng.integers(1, 4, CHUNK), 0)  # bit 0: colour 1, bit 1: colour 2
    caption_colors = np.where(np.stack([drop & 1, drop & 2], axis=1) > 0, _NO_COLOR, color_idx)
    filler = (rng.random(CHUNK) < mix.p_filler).astype(np.int64)
    centers = scenes.sample_centers(rng, shape_idx, size=size, radius=radius, relation_idx=relation)
    caption_index = _caption_lookup()[
        filler, relation, phrasing, caption_colors[:, 0], shape_idx[:, 0], caption_colors[:, 1], shape_idx[:, 1]
    ]
    return dict(shape_idx=shape_idx, color_idx=color_idx, relation=relation, centers=centers, caption_index=caption_index)


def _check_args(seed, step, global_batch, process_index, process_count, caption_mix) -> None:
    if seed < 0 or step < 0:
        raise ValueError(f"seed ({seed}) and step ({step}) must be non-negative integers")
    if global_batch <= 0 or process_count <= 0 or global_batch % process_count:
        raise ValueError(
            f"global_batch ({global_batch}) must be a positive multiple of process_count ({process_count}); "
            "pick a global batch divisible by the number of processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in [0, process_count={process_count})")
    if caption_mix not in CAPTION_MIXES:
        raise ValueError(f"Unknown caption_mix {caption_mix!r}; choose one of {sorted(CAPTION_MIXES)}")


def train_batch(
    seed: int, step: int, *, global_batch: int, process_index: int = 0, process_count: int = 1, size: int = 64,
    radius: int = 8, caption_mix: str = "train",
) -> dict[str, np.ndarray]:
    """This process's slice (global_batch // process_count examples) of the global batch at (seed, step).

    Keys: image float32[b,size,size,3] in [-1,1]; ids int32[b,20]; mask bool[b,20]; roles int8[b,20];
    caption_index int32[b] (into prompts.all_captions()); shape_idx, color_idx int32[b,2]; relation int32[b];
    centers float32[b,2,2] ((x, y) of object 1 and object 2).
    """
    _check_args(seed, step, global_batch, process_index, process_count, caption_mix)
    per_process = global_batch // process_count
    start, stop = process_index * per_process, (process_index + 1) * per_process
    chunks = [
        _draw_chunk(seed, step, k, CAPTION_MIXES[caption_mix], size, radius)
        for k in range(start // CHUNK, (stop - 1) // CHUNK + 1)
    ]
    offset = start - (start // CHUNK) * CHUNK
    drawn = {key: np.concatenate([c[key] for c in chunks])[offset: offset + per_process] for key in chunks[0]}
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


EVAL_SETS = {
    # every (color1, shape1, relation, color2, shape2) with the canonical phrasing: 2*3*8*2*3 = 288
    "all_combinations": lambda: [prompts.caption(s) for s in _full_color_specs()],
    # the same combinations with each non-canonical phrasing
    "phrasing": lambda: [
        prompts.caption(s, phrasing=p) for s in _full_color_specs() for p in range(1, len(prompts.PHRASINGS[s.relation]))
    ],
    # the canonical captions with filler words ("the red square is above the blue circle"), never seen in training
    "filler": lambda: [prompts.caption(s, filler=True) for s in _full_color_specs()],
}


def eval_prompts(name: str = "all_combinations") -> list[str]:
    """A fixed evaluation prompt set (EVAL_SET_VERSION); ValueError for an unknown name."""
    if name not in EVAL_SETS:
        raise ValueError(f"Unknown eval prompt set {name!r}; choose one of {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]()
