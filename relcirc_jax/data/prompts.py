"""The caption grammar of the relation scenes: phrasings, templates, caption <-> SceneSpec, word roles, vocabulary.

Grammar (lower case, words separated by single spaces): an object is "[colour] shape", and a caption is one of
TEMPLATES, with PHRASE one of PHRASINGS[relation] (index 0 is the canonical phrasing):

    plain       object1 is PHRASE object2              (the training captions, also the paper's)
    the_both    the object1 is PHRASE the object2
    the2        object1 is PHRASE the object2          (the paper's main evaluation prompts)
    no_is       object1 PHRASE object2
    no_is_the2  object1 PHRASE the object2
    reversed    PHRASE object2 is object1              (object1 is still the subject of the relation)

The last five are the paper's robustness templates besides "plain". Every caption the grammar allows is in
all_captions(), so caption_index() works for any caption parse() accepts; the empty caption "" (the CFG negative of
sample.negative="empty_prompt") has its own index EMPTY_CAPTION_INDEX just past them.

Word roles (ROLES) group text tokens for the attention synopsis:
  - colour / shape words of object 1 and object 2 (the subject and the reference of the relation, wherever they
    stand in the caption): "color1", "shape1", "color2", "shape2";
  - every word of the relation phrase, function words included ("to", "the", "of", "and", "from"): "relation",
    because the phrase as a whole carries the relation and the "the" inside "to the left of" is not a filler;
  - "is" and the determiner "the" in front of an object: "filler".
"""

import itertools
from typing import NamedTuple, Optional

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


class Template(NamedTuple):
    """How a caption arranges its two objects around the relation phrase."""

    copula: bool  # "is" between the subject and the phrase ("reversed": between object 2 and object 1)
    the1: bool  # "the" before object 1
    the2: bool  # "the" before object 2
    reversed: bool  # the phrase and object 2 come first


# Order fixes caption indices: "plain" and "the_both" first keep the indices of the captions of earlier versions.
TEMPLATES: dict[str, Template] = {
    "plain": Template(copula=True, the1=False, the2=False, reversed=False),
    "the_both": Template(copula=True, the1=True, the2=True, reversed=False),
    "the2": Template(copula=True, the1=False, the2=True, reversed=False),
    "no_is": Template(copula=False, the1=False, the2=False, reversed=False),
    "no_is_the2": Template(copula=False, the1=False, the2=True, reversed=False),
    "reversed": Template(copula=True, the1=False, the2=False, reversed=True),
}

ROLES = ("pad", "color1", "shape1", "relation", "color2", "shape2", "filler")
PAD = "<pad>"
_COPULA = "is"
_DETERMINER = "the"

# Bump VOCAB_VERSION whenever VOCAB changes: random text embeddings and cached encoder tables are indexed by it.
VOCAB_VERSION = 1
VOCAB: tuple[str, ...] = (PAD,) + tuple(
    sorted(
        set(COLORS)
        | set(SHAPES)
        | {_COPULA, _DETERMINER}
        | {w for ps in PHRASINGS.values() for p in ps for w in p.split()}
    )
)
_VOCAB_SET = frozenset(VOCAB[1:])
_GRAMMAR = (
    "'[the] <object1> [is] <relation phrase> [the] <object2>' as in TEMPLATES, or '<relation phrase> <object2> is "
    "<object1>', with <object> = '[<colour>] <shape>'"
)
_EXAMPLE = "'blue triangle is to the upper left of red square'"


class Parsed(NamedTuple):
    """A parsed caption: the scene it asks for, its words (lower case), one role name (from ROLES) per word, and the
    template and phrasing index it was written with."""

    spec: SceneSpec
    words: tuple[str, ...]
    roles: tuple[str, ...]
    template: str
    phrasing: int


def _check_spec(spec: SceneSpec, phrasing: int, template: str) -> None:
    problems = [
        f"shape{k} {s!r} is not one of {SHAPES}" for k, s in ((1, spec.shape1), (2, spec.shape2)) if s not in SHAPES
    ]
    problems += [
        f"color{k} {c!r} is not one of {COLORS} or None"
        for k, c in ((1, spec.color1), (2, spec.color2))
        if c is not None and c not in COLORS
    ]
    if spec.relation not in PHRASINGS:
        problems.append(f"relation {spec.relation!r} is not one of {RELATIONS}")
    elif not 0 <= phrasing < len(PHRASINGS[spec.relation]):
        problems.append(
            f"phrasing {phrasing} is out of range for {spec.relation!r} (0..{len(PHRASINGS[spec.relation]) - 1})"
        )
    if template not in TEMPLATES:
        problems.append(f"template {template!r} is not one of {tuple(TEMPLATES)}")
    if problems:
        raise ValueError(f"Bad SceneSpec {tuple(spec)}: " + "; ".join(problems))


def _object(color: Optional[str], shape: str, which: int, determiner: bool) -> list[tuple[str, str]]:
    """(word, role) pairs of one object."""
    return (
        ([(_DETERMINER, "filler")] if determiner else [])
        + ([(color, f"color{which}")] if color is not None else [])
        + [(shape, f"shape{which}")]
    )


def _words_and_roles(spec: SceneSpec, phrasing: int, template: str) -> list[tuple[str, str]]:
    t = TEMPLATES[template]
    first = _object(spec.color1, spec.shape1, 1, t.the1)
    second = _object(spec.color2, spec.shape2, 2, t.the2)
    phrase = [(w, "relation") for w in PHRASINGS[spec.relation][phrasing].split()]
    copula = [(_COPULA, "filler")] if t.copula else []
    return phrase + second + copula + first if t.reversed else first + copula + phrase + second


def caption(spec: SceneSpec, *, phrasing: int = 0, template: str = "plain") -> str:
    """The caption of `spec` with phrasing PHRASINGS[spec.relation][phrasing], written with TEMPLATES[template]."""
    _check_spec(spec, phrasing, template)
    return " ".join(w for w, _ in _words_and_roles(spec, phrasing, template))


def words_of(text: str) -> tuple[str, ...]:
    """The lower-cased words of a caption; ValueError naming the first word that is not in VOCAB."""
    words = tuple(text.lower().split())
    unknown = [w for w in words if w not in _VOCAB_SET]
    if unknown:
        raise ValueError(f"Unknown word {unknown[0]!r} in caption {text!r}; the vocabulary is {VOCAB[1:]}")
    return words


def _build_grammar() -> tuple[dict[str, int], list[Parsed]]:
    """Every caption of the grammar -> its index, and the parse of each, in a fixed order."""
    colors = COLORS + (None,)
    index, parsed = {}, []
    for template in TEMPLATES:
        for relation in RELATIONS:
            for phrasing in range(len(PHRASINGS[relation])):
                for c1, s1, c2, s2 in itertools.product(colors, SHAPES, colors, SHAPES):
                    spec = SceneSpec(s1, c1, relation, s2, c2)
                    pairs = _words_and_roles(spec, phrasing, template)
                    words = tuple(w for w, _ in pairs)
                    index[" ".join(words)] = len(parsed)
                    parsed.append(Parsed(spec, words, tuple(r for _, r in pairs), template, phrasing))
    return index, parsed


_CAPTION_INDEX, _PARSED = _build_grammar()
EMPTY_CAPTION_INDEX = len(_PARSED)


def _what_is_wrong(words: tuple[str, ...]) -> str:
    """A hint for a caption that is not in the grammar."""
    if words.count(_COPULA) > 1:
        return f"expected at most one 'is', found {words.count(_COPULA)}"
    if sum(w in SHAPES for w in words) != 2:
        return f"expected exactly two shape words {SHAPES}, found {sum(w in SHAPES for w in words)}"
    if words[:1] == (_DETERMINER,):
        return "a caption that starts with 'the' must read 'the <object1> is <relation phrase> the <object2>'"
    return "no template and relation phrase match these words"


def parse(text: str) -> Parsed:
    """Parse a caption (case and whitespace insensitive); ValueError on unknown words or ungrammatical captions."""
    words = words_of(text)
    index = _CAPTION_INDEX.get(" ".join(words))
    if index is None:
        raise ValueError(
            f"Caption {text!r} does not fit the grammar (e.g. {_EXAMPLE}): {_what_is_wrong(words)}. "
            f"The grammar is {_GRAMMAR}; relation phrases: {sorted(p for ps in PHRASINGS.values() for p in ps)}"
        )
    return _PARSED[index]._replace(words=words)


def all_captions() -> tuple[str, ...]:
    """Every caption of the grammar (templates x specs x phrasings x colour-optional), in a fixed order."""
    return tuple(_CAPTION_INDEX)


def caption_index(text: str) -> int:
    """Index of a caption in all_captions() (case and whitespace insensitive), EMPTY_CAPTION_INDEX for "";
    ValueError if it is not a caption."""
    normalized = " ".join(text.lower().split())
    if not normalized:
        return EMPTY_CAPTION_INDEX
    index = _CAPTION_INDEX.get(normalized)
    if index is None:
        parse(text)  # raises the precise error
    return index
