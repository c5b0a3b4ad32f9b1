"""Caption grammar (prompts.py) and word tokenizer (data/tokenizer.py): round trips, roles, vocabulary, errors."""

import itertools

import numpy as np
import pytest

from relcirc_jax.data import prompts, tokenizer
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES, SceneSpec

COLOR_CHOICES = COLORS + (None,)


def _every_variant():
    for relation in RELATIONS:
        for phrasing, template in itertools.product(range(len(prompts.PHRASINGS[relation])), prompts.TEMPLATES):
            for c1, s1, c2, s2 in itertools.product(COLOR_CHOICES, SHAPES, COLOR_CHOICES, SHAPES):
                yield SceneSpec(s1, c1, relation, s2, c2), phrasing, template


def test_paper_phrasings_canonical_first():
    assert prompts.PHRASINGS["upper_left"] == (
        "to the upper left of",
        "above and to the left of",
        "diagonally up and left from",
    )
    assert prompts.PHRASINGS["above"] == ("above", "directly above", "higher than")
    assert prompts.PHRASINGS["left"] == ("to the left of", "left of")
    assert tuple(prompts.PHRASINGS) == RELATIONS


def test_canonical_and_variant_forms():
    spec = SceneSpec("triangle", "blue", "upper_left", "square", "red")
    assert prompts.caption(spec) == "blue triangle is to the upper left of red square"
    assert prompts.caption(spec, phrasing=2) == "blue triangle is diagonally up and left from red square"
    assert prompts.caption(spec._replace(color1=None)) == "triangle is to the upper left of red square"
    spec = SceneSpec("square", "red", "upper_left", "circle", "blue")
    expected = {  # the paper's robustness templates (generalization_profile_eval_cli)
        "plain": "red square is to the upper left of blue circle",
        "the_both": "the red square is to the upper left of the blue circle",
        "the2": "red square is to the upper left of the blue circle",
        "no_is": "red square to the upper left of blue circle",
        "no_is_the2": "red square to the upper left of the blue circle",
        "reversed": "to the upper left of blue circle is red square",
    }
    assert {name: prompts.caption(spec, template=name) for name in prompts.TEMPLATES} == expected


def test_round_trip_every_phrasing_colour_optional_and_template():
    count = 0
    for spec, phrasing, template in _every_variant():
        text = prompts.caption(spec, phrasing=phrasing, template=template)
        parsed = prompts.parse(text)
        assert (parsed.spec, parsed.phrasing) == (spec, phrasing)
        assert prompts.caption(parsed.spec, phrasing=phrasing, template=parsed.template) == text
        assert parsed.words == tuple(text.split()) and len(parsed.roles) == len(parsed.words)
        assert prompts.all_captions()[prompts.caption_index(text)] == text
        count += 1
    assert count == len(prompts.all_captions()) == len(set(prompts.all_captions())) == 6 * 22 * 81
    assert prompts.caption_index("") == prompts.EMPTY_CAPTION_INDEX == len(prompts.all_captions())


def test_caption_indices_of_earlier_versions_are_kept():
    # Cached text tables and datasets index captions: "plain" then "the_both" keep their version-1 positions.
    assert prompts.caption_index("red triangle is above red triangle") == 0
    # the_both block (after 22 phrasings x 81 plain captions), "below" phrasing 2 (after 3 + 2 phrasings of 81),
    # colours/shapes (None, triangle, None, circle) = row 2 * 27 + 0 * 9 + 2 * 3 + 1 of the colour/shape product
    assert prompts.caption_index("the triangle is lower than the circle") == 22 * 81 + 5 * 81 + 61


def test_parse_is_case_and_whitespace_insensitive():
    parsed = prompts.parse("  The BLUE triangle\tis above and to the left of   the red Square ")
    assert parsed.spec == SceneSpec("triangle", "blue", "upper_left", "square", "red")
    assert prompts.caption_index(" Blue Triangle is ABOVE red square") == prompts.caption_index(
        "blue triangle is above red square"
    )


def test_roles_of_a_filler_caption():
    parsed = prompts.parse("the blue triangle is to the left of the red square")
    assert parsed.roles == (
        "filler",
        "color1",
        "shape1",
        "filler",
        "relation",
        "relation",
        "relation",
        "relation",
        "filler",
        "color2",
        "shape2",
    )


def test_reversed_caption_keeps_the_subject_as_object_1():
    parsed = prompts.parse("above blue square is red circle")
    assert parsed.spec == SceneSpec("circle", "red", "above", "square", "blue") and parsed.template == "reversed"
    assert parsed.roles == ("relation", "color2", "shape2", "filler", "color1", "shape1")


def test_vocab_is_pad_then_sorted_grammar_words():
    assert prompts.VOCAB[0] == "<pad>"
    assert list(prompts.VOCAB[1:]) == sorted(set(" ".join(prompts.all_captions()).split()))
    assert isinstance(prompts.VOCAB_VERSION, int)


def test_vocab_version_1_is_frozen():
    # Random text embeddings are indexed by VOCAB: a change here must come with a VOCAB_VERSION bump.
    assert prompts.VOCAB_VERSION == 1
    assert prompts.VOCAB == (
        "<pad>",
        "above",
        "and",
        "below",
        "blue",
        "circle",
        "diagonally",
        "directly",
        "down",
        "from",
        "higher",
        "is",
        "left",
        "lower",
        "of",
        "red",
        "right",
        "square",
        "than",
        "the",
        "to",
        "triangle",
        "up",
        "upper",
    )


def test_unknown_word_error_names_word_and_vocabulary():
    with pytest.raises(ValueError, match=r"Unknown word 'hexagon'.*vocabulary.*'triangle'"):
        prompts.parse("red hexagon is above blue circle")
    with pytest.raises(ValueError, match=r"Unknown word 'hexagon'"):
        tokenizer.encode(["red hexagon is above blue circle"])
    with pytest.raises(ValueError, match=r"Unknown word"):
        prompts.caption_index("red hexagon is above blue circle")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("red square is is above blue circle", "at most one 'is'"),
        ("red is above blue circle", "two shape words"),
        ("red square is above and blue circle", "no template and relation phrase match"),
        ("red square is above blue", "two shape words"),
        ("the red square is above blue circle", "must read 'the <object1> is <relation phrase> the <object2>'"),
    ],
)
def test_malformed_caption_error_says_what_was_expected(text, expected):
    with pytest.raises(ValueError, match="does not fit the grammar") as info:
        prompts.parse(text)
    assert expected in str(info.value)


def test_bad_spec_and_phrasing_rejected():
    with pytest.raises(ValueError, match="relation 'inside'"):
        prompts.caption(SceneSpec("square", "red", "inside", "circle", "blue"))
    with pytest.raises(ValueError, match="phrasing 2 is out of range for 'left'"):
        prompts.caption(SceneSpec("square", "red", "left", "circle", "blue"), phrasing=2)
    with pytest.raises(ValueError, match="color1 'green'"):
        prompts.caption(SceneSpec("square", "green", "left", "circle", "blue"))


def test_tokenizer_ids_and_roles_align_with_parse():
    captions = [
        prompts.caption(s, phrasing=p, template=t) for s, p, t in itertools.islice(_every_variant(), 0, None, 97)
    ]
    ids, mask = tokenizer.encode(captions)
    role_ids = tokenizer.roles(captions)
    assert ids.shape == mask.shape == role_ids.shape == (len(captions), tokenizer.MAX_LEN)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and role_ids.dtype == np.int8
    for row, text in enumerate(captions):
        parsed = prompts.parse(text)
        n = len(parsed.words)
        assert [prompts.VOCAB[i] for i in ids[row, :n]] == list(parsed.words)
        assert [prompts.ROLES[r] for r in role_ids[row, :n]] == list(parsed.roles)
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == 0).all() and (role_ids[row, n:] == 0).all()
        assert ((role_ids[row] == 0) == ~mask[row]).all()


def test_caption_tables_match_encode_row_for_row():
    ids, mask, role_ids = tokenizer.caption_tables()
    captions = prompts.all_captions()
    rows = np.arange(0, len(captions), 53)
    expected_ids, expected_mask = tokenizer.encode([captions[i] for i in rows])
    np.testing.assert_array_equal(ids[rows], expected_ids)
    np.testing.assert_array_equal(mask[rows], expected_mask)
    np.testing.assert_array_equal(role_ids[rows], tokenizer.roles([captions[i] for i in rows]))


def test_too_long_caption_error_names_it():
    text = "red square is above blue circle"
    with pytest.raises(ValueError, match=r"Caption 'red square is above blue circle' has 6 words, more than max_len=5"):
        tokenizer.encode([text], max_len=5)
    with pytest.raises(ValueError, match=r"more than max_len=5"):
        tokenizer.roles([text], max_len=5)


def test_single_string_is_rejected():
    with pytest.raises(TypeError, match="sequence of captions"):
        tokenizer.encode("red square is above blue circle")
