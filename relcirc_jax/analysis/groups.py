"""How tokens are grouped for the analyses: caption tokens by role, image tokens by the object they show.

Text roles (TEXT_ROLES): the grammar's roles (data.prompts.ROLES: pad, color1, shape1, relation, color2, shape2,
filler) plus "special" for a Hugging Face tokenizer's [CLS]/[SEP]/</s>. Image groups (IMAGE_GROUPS): object 1 (the
first named), object 2 and background, as soft weights per token: the fraction of the token's patch covered by that
object's pixels in the generated image (the detector's colour coverage near the object's detected centre). Images
whose objects the evaluator could not bind get zero object weights, so they do not count towards object groups.
"""

from typing import Sequence

import numpy as np

from relcirc_jax import evaluation
from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.data.spec import COLORS
from relcirc_jax.evaluation.detector import MASK_THRESHOLD, check_images, color_coverage
from relcirc_jax.text.cache import SPECIAL_ROLE

TEXT_ROLES = prompts.ROLES + ("special",)
IMAGE_GROUPS = ("object1", "object2", "background")
OBJECT_REACH_PER_RADIUS = 1.6  # pixels further than this from a detected centre do not belong to that object


def token_roles(conditioner, captions: Sequence[str]) -> np.ndarray:
    """int32[B, L] index into TEXT_ROLES of every caption token the DiT sees (word-level RTE or a cached encoder)."""
    if conditioner.token_roles is None:
        roles = tokenizer.roles(captions)
    else:
        roles = conditioner.token_roles[[prompts.caption_index(c) for c in captions]]
    roles = np.asarray(roles, np.int32)
    return np.where(roles == SPECIAL_ROLE, TEXT_ROLES.index("special"), roles)


def image_token_groups(images: np.ndarray, captions: Sequence[str], patch_size: int, radius: float) -> np.ndarray:
    """float32[B, grid*grid, 3] weights of each image token in (object 1, object 2, background), row-major tokens."""
    images = check_images(images)
    n, size = len(images), images.shape[1]
    specs = [prompts.parse(c).spec for c in captions]
    scores = evaluation.score_detections(evaluation.detect(images), evaluation.encode_specs(specs), size=size)
    coverage = color_coverage(images) > MASK_THRESHOLD  # [C, N, H, W]
    any_object = coverage.any(0)
    ys, xs = np.mgrid[:size, :size] + 0.5
    pixels = np.zeros((3, n, size, size), np.float32)
    distance = np.zeros((2, n, size, size), np.float32)
    for k, (color_field, (cx, cy)) in enumerate((("color1", (0, 1)), ("color2", (2, 3)))):
        centers = scores["centers"][:, [cx, cy]]
        found = np.isfinite(centers).all(1) & scores["unique_binding"]
        distance[k] = np.hypot(xs - np.nan_to_num(centers[:, :1, None]), ys - np.nan_to_num(centers[:, 1:, None]))
        colors = [getattr(spec, color_field) for spec in specs]
        own = np.stack([coverage[COLORS.index(c)][i] if c else any_object[i] for i, c in enumerate(colors)])
        pixels[k] = own & (distance[k] < OBJECT_REACH_PER_RADIUS * radius) & found[:, None, None]
    # A pixel both objects claim (a caption without a colour word, or both objects in one colour) goes to the nearer.
    claimed_by_both = (pixels[0] > 0) & (pixels[1] > 0)
    pixels[0][claimed_by_both & (distance[0] > distance[1])] = 0
    pixels[1][claimed_by_both & (distance[1] >= distance[0])] = 0
    pixels[2] = ~any_object
    grid = size // patch_size
    tokens = pixels.reshape(3, n, grid, patch_size, grid, patch_size).mean((3, 5))
    return tokens.reshape(3, n, grid * grid).transpose(1, 2, 0)
