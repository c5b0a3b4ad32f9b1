"""Word-level tokenizer of the scene grammar: captions -> VOCAB ids, padding mask and per-token role ids (ROLES).

encode() accepts any sequence of VOCAB words (ablation studies feed ungrammatical ones); roles() needs grammatical
captions. The training data path does not tokenize at all: caption_tables() holds every caption of the grammar,
tokenized once, and batches gather its rows by caption index.
"""

import functools
from typing import Sequence

import numpy as np

from relcirc_jax.data import prompts

MAX_LEN = 20
_WORD_ID = {word: index for index, word in enumerate(prompts.VOCAB)}
_ROLE_ID = {role: index for index, role in enumerate(prompts.ROLES)}


def _check_length(caption: str, max_len: int) -> None:
    words = caption.split()
    if len(words) > max_len:
        raise ValueError(
            f"Caption {caption!r} has {len(words)} words, more than max_len={max_len}; shorten it or raise max_len"
        )


def _pad(rows: Sequence[Sequence[int]], max_len: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), max_len), dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _word_ids(caption: str, max_len: int) -> list[int]:
    _check_length(caption, max_len)
    return [_WORD_ID[w] for w in prompts.words_of(caption)]


def _role_ids(caption: str, max_len: int) -> list[int]:
    _check_length(caption, max_len)
    return [_ROLE_ID[r] for r in prompts.parse(caption).roles]


@functools.lru_cache(maxsize=None)
def caption_tables(max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32, mask bool, roles int8), each [len(all_captions()), max_len], row k for all_captions()[k]."""
    captions = prompts.all_captions()
    ids = _pad([_word_ids(c, max_len) for c in captions], max_len, np.int32)
    roles = _pad([_role_ids(c, max_len) for c in captions], max_len, np.int8)
    for table in (ids, roles):
        table.flags.writeable = False
    mask = ids != 0
    mask.flags.writeable = False
    return ids, mask, roles


def encode(captions: Sequence[str], max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[N,max_len], mask bool[N,max_len]) over prompts.VOCAB, padded with 0 ("<pad>")."""
    if isinstance(captions, str):
        raise TypeError("encode() takes a sequence of captions; wrap a single caption in a list")
    ids = _pad([_word_ids(c, max_len) for c in captions], max_len, np.int32)
    return ids, ids != 0


def roles(captions: Sequence[str], max_len: int = MAX_LEN) -> np.ndarray:
    """int8[N,max_len] role ids (index into prompts.ROLES, 0 = pad) of grammatical captions."""
    if isinstance(captions, str):
        raise TypeError("roles() takes a sequence of captions; wrap a single caption in a list")
    return _pad([_role_ids(c, max_len) for c in captions], max_len, np.int8)
