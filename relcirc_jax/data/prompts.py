"""The caption grammar of the relation scenes: phrasings per relation, caption <-> SceneSpec, word roles, vocabulary.

Grammar (lower case, words separated by single spaces)::

    caption := object "is" PHRASE object
    object  := ["the"] [colour] shape          # "the" appears on both objects or on neither (filler variant)

PHRASE is one of PHRASINGS[relation]; index 0 is the canonical phrasing. Every caption the grammar allows is in
all_captions(), so caption_index() works for any caption parse() accepts.

Word roles (ROLES) group text tokens for the attention synopsis:
  - colour / shape words of object 1 and object 2: "color1", "shape1", "color2", "shape2";
  - every word of the relation phrase, function words included ("to", "the", "of", "and", "from"): "relation",
    because the phrase as a whole carries the relation and the "the" inside "to the left of" is not a filler;
  - "is" and the determiner "the" in front of an object: "filler".
"""
import itertools
from typing import NamedTuple, Optional, Sequence

from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec

PHRASINGS: dict[str, tuple[str, ...]] = {
    "above": ("above", "directly above", "higher than"),
    "below": ("below", "directly below", "lower than"),
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "upper_left": ("to the upper left of", "above and to the left of", "diagonally up and left from"),
    "upper_right": ("to the upper right of", "above and to the right of", "diagonally up and right from"),
    "lower_left": ("to the lower left of", "below and to the left of", "diagonally down and left from"),
    "lower_right": ("to the lower right of", "below and to the right of", "diagonally down and right from"),
}
assert tuple(PHRASINGS) == RELATIONS

ROLES = ("pad", "color1", "shape1", "relation", "color2", "shape2", "filler")
PAD = "<pad>"
_COPULA = "is"
_DETERMINER = "the"

# Bump VOCAB_VERSION whenever VOCAB changes: random text embeddings and cached encoder tables are indexed by it.
VOCAB_VERSION = 1
VOCAB: tuple[str, ...] = (PAD,) + tuple(
    sorted(set(COLORS) | set(SHAPES) | {_COPULA, _DETERMINER} | {w for ps in PHRASINGS.values() for p in ps for w in p.split()})
)
_VOCAB_SET = frozenset(VOCAB[1:])
_GRAMMAR = "'[the] [<colour>] <shape> is <relation phrase> [the] [<colour>] <shape>'"
_EXAMPLE = "'blue triangle is to the upper left of red square'"


class Parsed(NamedTuple):
    """A parsed caption: the scene it asks for, its words (lower case) and one role name (from ROLES) per word."""

    spec: SceneSpec
    words: tuple[str, ...]
    roles: tuple[str, ...]


def _check_spec(spec: SceneSpec, phrasing: int) -> None:
    problems = [f"shape{k} {s!r} is not one of {SHAPES}" for k, s in ((1, spec.shape1), (2, spec.shape2)) if s not in SHAPES]
    problems += [
        f"color{k} {c!r} is not one of {COLORS} or None" for k, c in ((1, spec.color1), (2, spec.color2))
        if c is not None and c not in COLORS
    ]
    if spec.relation not in PHRASINGS:
        problems.append(f"relation {spec.relation!r} is not one of {RELATIONS}")
    elif not 0 <= phrasing < len(PHRASINGS[spec.relation]):
        problems.append(f"phrasing {phrasing} is out of range for {spec.relation!r} (0..{len(PHRASINGS[spec.relation]) - 1})")
    if problems:
        raise ValueError(f"Bad SceneSpec {tuple(spec)}: " + "; ".join(problems))


def _object_words(color: Optional[str], shape: str, filler: bool) -> list[str]:
    return ([_DETERMINER] if filler else []) + ([color] if color is not None else []) + [shape]


def caption(spec: SceneSpec, *, phrasing: int = 0, filler: bool = False) -> str:
    """The caption of `spec` with phrasing PHRASINGS[spec.relation][phrasing]; filler=True puts "the" before both objects."""
    _check_spec(spec, phrasing)
    words = (
        _object_words(spec.color1, spec.shape1, filler)
        + [_COPULA, PHRASINGS[spec.relation][phrasing]]
        + _object_words(spec.color2, spec.shape2, filler)
    )
    return " ".join(words)


def _parse_object(words: Sequence[str], which: int) -> Optional[tuple[Optional[str], str, bool, tuple[str, ...]]]:
    """(colour, shape, has_determiner, roles) of one object's words, or None when they are not '[the] [colour] shape'."""
    has_determiner = bool(words) and words[0] == _DETERMINER
    rest = list(words[1:] if has_determiner else words)
    if not rest or rest[-1] not in SHAPES or len(rest) > 2 or (len(rest) == 2 and rest[0] not in COLORS):
        return None
    color = rest[0] if len(rest) == 2 else None
    roles = ("filler",) * has_determiner + (f"color{which}",) * (color is not None) + (f"shape{which}",)
    return color, rest[-1], has_determiner, roles


def _malformed(text: str, what: str) -> ValueError:
    return ValueError(f"Caption {text!r} does not fit the grammar {_GRAMMAR} (e.g. {_EXAMPLE}): {what}")


def words_of(text: str) -> tuple[str, ...]:
    """The lower-cased words of a caption; ValueError naming the first word that is not in VOCAB."""
    words = tuple(text.lower().split())
    unknown = [w for w in words if w not in _VOCAB_SET]
    if unknown:
        raise ValueError(f"Unknown word {unknown[0]!r} in caption {text!r}; the vocabulary is {VOCAB[1:]}")
    return words


def parse(text: str) -> Parsed:
    """Parse a caption (case and whitespace insensitive); raises ValueError on unknown words or ungrammatical captions."""
    words = words_of(text)
    if words.count(_COPULA) != 1:
        raise _malformed(text, f"expected exactly one 'is', found {words.count(_COPULA)}")
    split = words.index(_COPULA)
    first = _parse_object(words[:split], 1)
    if first is None:
        raise _malformed(text, f"expected '[the] [<colour>] <shape>' before 'is', got {' '.join(words[:split])!r}")
    after = words[split + 1:]
    for relation, phrases in PHRASINGS.items():
        for phrase in phrases:
            phrase_words = tuple(phrase.split())
            if after[: len(phrase_words)] != phrase_words:
                continue
            second = _parse_object(after[len(phrase_words):], 2)
            if second is None:
                continue
            if first[2] != second[2]:
                raise _malformed(text, "'the' must stand before both objects or before neither")
            spec = SceneSpec(first[1], first[0], relation, second[1], second[0])
            roles = first[3] + ("filler",) + ("relation",) * len(phrase_words) + second[3]
            return Parsed(spec, words, roles)
    raise _malformed(
        text, f"expected a relation phrase then '[the] [<colour>] <shape>' after 'is', got {' '.join(after)!r}; "
        f"phrases: {sorted(p for ps in PHRASINGS.values() for p in ps)}"
    )


def _caption_table() -> dict[str, int]:
    colors = COLORS + (None,)
    captions = (
        caption(SceneSpec(s1, c1, relation, s2, c2), phrasing=phrasing, filler=filler)
        for filler in (False, True)
        for relation in RELATIONS
        for phrasing in range(len(PHRASINGS[relation]))
        for c1, s1, c2, s2 in itertools.product(colors, SHAPES, colors, SHAPES)
    )
    return {text: index for index, text in enumerate(captions)}


_CAPTION_INDEX = _caption_table()


def all_captions() -> tuple[str, ...]:
    """Every caption of the grammar (specs x phrasings x colour-optional x filler), in a fixed order."""
    return tuple(_CAPTION_INDEX)


def caption_index(text: str) -> int:
    """Index of a caption in all_captions() (case and whitespace insensitive); ValueError if it is not a caption."""
    index = _CAPTION_INDEX.get(" ".join(text.lower().split()))
    if index is None:
        parse(text)  # raises the precise error; every parseable caption is in the table
        raise AssertionError(f"parseable caption {text!r} missing from all_captions()")
    return index
