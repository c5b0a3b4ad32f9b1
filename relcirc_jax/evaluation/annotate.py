"""Show what the evaluator judged: each image upscaled, its detected objects boxed and tagged, its verdicts below.

annotate(images, detections, verdicts) -> uint8 images, one per input, for eyeballing an evaluation. Per image:
- the image, upscaled `scale` times (nearest neighbour);
- every detected object: a box of half-side radius + 1 px around its centre and a cross on the centre, in yellow
  for a red object, green for a blue one, white for colour -1 (neither), with its shape's letter (T triangle, C circle,
  S square, ? for -1) on a tag of the same colour at the box's upper-left corner;
- a banner under it: one tag per verdict, green = pass, red = fail, dark gray = not in `verdicts`:
  C colour, S shape, B unique binding, R strict relation, L loose relation, then a tick / cross for overall.
Pure numpy and PIL (its built-in bitmap font, drawn small and enlarged, so nothing is downloaded).
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from relcirc_jax.data.spec import COLORS, SHAPES
from relcirc_jax.evaluation.detector import Detections, check_images

# Banner tags: (letter, key of the verdicts dict, as score_specs / score_detections return them).
VERDICT_TAGS = (
    ("C", "color"),
    ("S", "shape"),
    ("B", "unique_binding"),
    ("R", "spatial_relationship"),
    ("L", "spatial_relationship_loose"),
)
OVERALL = "overall"
PASS_RGB, FAIL_RGB, MISSING_RGB = (0, 150, 0), (200, 0, 0), (70, 70, 70)
BANNER_RGB = (0, 0, 0)
BOX_RGB = {COLORS.index("red"): (255, 255, 0), COLORS.index("blue"): (0, 255, 0), -1: (255, 255, 255)}
SHAPE_LETTERS = {**{SHAPES.index(name): name[0].upper() for name in SHAPES}, -1: "?"}
_BANNER_AT_ZOOM_1 = 12  # px: 6 px capitals with 3 px above and below
_font_cache = []


def zoom_for(scale: int) -> int:
    """How much the bitmap font (6 px capitals) is enlarged: half the image scale, at least 1."""
    return max(1, scale // 2)


def banner_height(scale: int) -> int:
    """Rows the verdict banner adds under each upscaled image."""
    return _BANNER_AT_ZOOM_1 * zoom_for(scale)


def annotate(
    images_uint8: np.ndarray, det: Detections, verdicts: dict, *, scale: int = 4, radius: float | None = None
) -> np.ndarray:
    """uint8[N, S * scale + banner_height(scale), S * scale, 3]: the annotated images (see the module docstring).

    det: detections over this batch (det.image indexes it); verdicts: bool[N] per name in VERDICT_TAGS and OVERALL
    (extra keys, e.g. "centers", are ignored); radius: of the boxes, None -> size / 8 (the renderer's default).
    """
    images = check_images(images_uint8)
    n, size = len(images), images.shape[1]
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    shown = {key: np.asarray(verdicts[key]) for key in [key for _, key in VERDICT_TAGS] + [OVERALL] if key in verdicts}
    for key, value in shown.items():
        if value.shape != (n,):
            raise ValueError(f"verdicts[{key!r}] must be bool[{n}] (one per image), got shape {value.shape}")
    radius = size / 8 if radius is None else float(radius)
    zoom = zoom_for(scale)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    out = np.empty((n, size * scale + banner_height(scale), size * scale, 3), np.uint8)
    for i in range(n):
        out[i, : size * scale] = _draw_objects(big[i], det, i, scale, radius, zoom)
        out[i, size * scale :] = _banner({key: value[i] for key, value in shown.items()}, size * scale, zoom)
    return out


def _draw_objects(image: np.ndarray, det: Detections, index: int, scale: int, radius: float, zoom: int) -> np.ndarray:
    """The upscaled image with a box, a centre cross and a shape tag per detection of image `index`."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(1, scale // 2)
    half, arm = (radius + 1) * scale, 1.5 * scale
    tags = []
    for row in np.flatnonzero(np.asarray(det.image) == index):
        color = BOX_RGB.get(int(det.color[row]), BOX_RGB[-1])
        x, y = float(det.x[row]) * scale, float(det.y[row]) * scale
        draw.rectangle([round(x - half), round(y - half), round(x + half), round(y + half)], outline=color, width=width)
        draw.line([(x - arm, y), (x + arm, y)], fill=color, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=color, width=width)
        tags.append((SHAPE_LETTERS.get(int(det.shape[row]), "?"), color, round(x - half), round(y - half)))
    out = np.array(canvas)
    for letter, color, left, top in tags:  # after all boxes, so no box is drawn over a tag
        tag = _tag(letter, (0, 0, 0), color, zoom)
        tag_top = top - tag.shape[0] if top - tag.shape[0] >= 0 else top + round(2 * half)  # above, else below
        _paste(out, tag, tag_top, left)
    return out


def _banner(verdict: dict, width: int, zoom: int) -> np.ndarray:
    """uint8[banner, width, 3]: the verdict tags of one image, drawn at zoom 1 and enlarged."""
    base_width = -(-width // zoom)
    banner = np.empty((_BANNER_AT_ZOOM_1, base_width, 3), np.uint8)
    banner[:] = BANNER_RGB
    slots = len(VERDICT_TAGS) + 1
    edges = np.linspace(0, base_width, slots + 1).round().astype(int)
    for slot, (letter, key) in enumerate(VERDICT_TAGS + (("", OVERALL),)):
        left, right = edges[slot] + 1, edges[slot + 1] - 1
        fill = MISSING_RGB if key not in verdict else PASS_RGB if bool(verdict[key]) else FAIL_RGB
        banner[1:-1, left:right] = fill
        if key == OVERALL:
            _mark(banner, left, right, key in verdict and bool(verdict[key]))
        else:
            glyph = _tag(letter, (255, 255, 255), fill, 1, pad=0)
            _paste(banner, glyph, (_BANNER_AT_ZOOM_1 - glyph.shape[0]) // 2, (left + right - glyph.shape[1]) // 2)
    return banner.repeat(zoom, axis=0).repeat(zoom, axis=1)[:, :width]


def _mark(banner: np.ndarray, left: int, right: int, passed: bool) -> None:
    """A white tick (pass) or cross (fail) of 6 x 6 px centred in banner[:, left:right], in place."""
    canvas = Image.fromarray(banner)
    draw = ImageDraw.Draw(canvas)
    x0, y0 = (left + right) // 2 - 3, _BANNER_AT_ZOOM_1 // 2 - 3
    if passed:
        draw.line([(x0, y0 + 3), (x0 + 2, y0 + 5), (x0 + 6, y0)], fill=(255, 255, 255))
    else:
        draw.line([(x0, y0), (x0 + 5, y0 + 5)], fill=(255, 255, 255))
        draw.line([(x0, y0 + 5), (x0 + 5, y0)], fill=(255, 255, 255))
    banner[:] = np.asarray(canvas)


def _font():
    if not _font_cache:  # Pillow >= 10.1 names the bitmap font load_default_imagefont; before, load_default
        _font_cache.append(getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)())
    return _font_cache[0]


def _tag(text: str, fg: tuple, bg: tuple, zoom: int, pad: int = 1) -> np.ndarray:
    """uint8[h, w, 3]: `text` in the bitmap font, cropped to its ink, `pad` px of bg around it, enlarged `zoom` x."""
    mask = Image.new("L", (8 * len(text) + 8, 16), 0)
    ImageDraw.Draw(mask).text((2, 0), text, font=_font(), fill=255)
    ink = np.asarray(mask) > 127
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    ink = np.pad(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], pad)
    tag = np.where(ink[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
    return tag.repeat(zoom, axis=0).repeat(zoom, axis=1)


def _paste(target: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """target[top:, left:] = patch, shifted to lie inside target (in place)."""
    top = min(max(top, 0), target.shape[0] - patch.shape[0])
    left = min(max(left, 0), target.shape[1] - patch.shape[1])
    target[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
