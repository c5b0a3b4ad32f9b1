"""Frozen Hugging Face text encoders run once per caption into a table [num_captions, 20, D] (+ mask, token ids and
per-token roles), saved in the workdir as .npz keyed by encoder name + a fingerprint, and reused while it matches.

Captions are tokenized by the checkpoint's own fast tokenizer (padded / truncated to MAX_LEN tokens, special tokens
included, as PixArt does for T5). Token roles are ids into prompts.ROLES taken from parse(caption).roles via the fast
tokenizer's word_ids(); padding is role 0 ("pad") and special tokens ([CLS], [SEP], </s>) get SPECIAL_ROLE (-1).
"""

import hashlib
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from relcirc_jax.data import prompts
from relcirc_jax.data.tokenizer import MAX_LEN
from relcirc_jax.text import bert, hf_loading, t5

SPECIAL_ROLE = -1
CACHE_FORMAT_VERSION = 2  # 2: the checkpoint fingerprint hashes the tokenizer files and samples the weights
_ROLE_ID = {role: index for index, role in enumerate(prompts.ROLES)}

# family -> (load(path, dtype) -> (config, params), encode(config, params, ids, mask) -> float32[B, L, D]).
ENCODER_FAMILIES = {
    "t5": (t5.load_t5_encoder, t5.t5_encode),
    "bert": (bert.load_bert_encoder, bert.bert_encode),
}


class TokenizedCaptions(NamedTuple):
    ids: np.ndarray  # int32[N, L] ids of the HF tokenizer
    mask: np.ndarray  # bool[N, L], True on real tokens (special tokens included)
    roles: np.ndarray  # int8[N, L] index into prompts.ROLES; SPECIAL_ROLE on special tokens


class TextTable(NamedTuple):
    embeddings: np.ndarray  # float32[N, L, D], row k for captions[k]
    mask: np.ndarray
    ids: np.ndarray
    roles: np.ndarray


# A checkpoint directory must hold one of these: transformers 5 otherwise builds an empty tokenizer without a word.
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.txt")


def _fast_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"No tokenizer in {path!r}: expected one of {_TOKENIZER_FILES} next to the weights (copy the tokenizer "
            "files of the same Hugging Face checkpoint there)."
        )
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "Tokenizing captions for a Hugging Face encoder needs transformers: pip install transformers"
        ) from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(
            f"Could not load the tokenizer of {path!r} ({e}). The directory needs tokenizer.json, or spiece.model "
            "plus `pip install sentencepiece` so transformers can build the fast tokenizer."
        ) from e
    if not tokenizer.is_fast:
        raise ValueError(
            f"The tokenizer in {path!r} is not a fast tokenizer (needed for word_ids); add its tokenizer.json"
        )
    return tokenizer


def _token_roles(word_ids: Sequence[Optional[int]], token_mask: Sequence[int], word_roles: Sequence[str]) -> list[int]:
    roles = []
    for word, real in zip(word_ids, token_mask):
        if not real:
            roles.append(_ROLE_ID["pad"])
        elif word is None:
            roles.append(SPECIAL_ROLE)
        else:
            roles.append(_ROLE_ID[word_roles[word]])
    return roles


def hf_tokenize(path: str, captions: Sequence[str], max_len: int = MAX_LEN) -> TokenizedCaptions:
    """Tokenize grammatical captions (or the empty caption) with the fast tokenizer stored in the local checkpoint
    directory `path`."""
    tokens = _fast_tokenizer(path)(
        list(captions), padding="max_length", truncation=True, max_length=max_len, return_tensors="np"
    )
    roles = [
        _token_roles(tokens.word_ids(i), tokens["attention_mask"][i], prompts.parse(c).roles if c else ())
        for i, c in enumerate(captions)
    ]
    return TokenizedCaptions(
        tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(bool), np.asarray(roles, np.int8)
    )


def encode_in_batches(
    encode: Callable, params, ids: np.ndarray, mask: np.ndarray, *, batch_size: int = 64, name: str = "encoder"
) -> np.ndarray:
    """float32[N, L, D] = encode(params, ids, mask) over fixed-size batches (the last one padded: one compilation).
    Logs progress about every tenth of the way (all ~10,700 captions take a minute or two on a laptop CPU)."""
    encode = jax.jit(encode)
    params = jax.device_put(params)  # once, not on every call
    count = ids.shape[0]
    log_every = max(1, -(-count // batch_size) // 10)  # batches
    outputs, start_time = [], time.time()
    for start in range(0, count, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), count - 1)
        out = encode(params, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]))
        outputs.append(np.asarray(out)[: min(batch_size, count - start)])
        done, elapsed = start + len(outputs[-1]), time.time() - start_time
        if len(outputs) % log_every == 0 or done == count:
            left = elapsed / done * (count - done)
            logging.info("%s: encoded %d/%d captions (%.0f s, ~%.0f s left)", name, done, count, elapsed, left)
    return np.concatenate(outputs, axis=0)


def _fingerprint(
    name: str, family: str, checkpoint_dir: str, captions: Sequence[str], max_len: int, param_dtype
) -> str:
    digest = hashlib.sha256()
    for part in (
        f"v{CACHE_FORMAT_VERSION}",
        name,
        family,
        str(max_len),
        jnp.dtype(param_dtype).name,
        hf_loading.checkpoint_fingerprint(checkpoint_dir),
        "\n".join(captions),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_path(workdir, name: str, fingerprint: str) -> epath.Path:
    """workdir/text_cache/{name}-{fingerprint}.npz (local or gs://)."""
    return epath.Path(workdir) / "text_cache" / f"{name}-{fingerprint}.npz"


def _save(path: epath.Path, table: TextTable) -> None:
    if jax.process_index() != 0:  # every process computed the same table; one writes it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / (path.name + ".partial")
    with partial.open("wb") as f:
        np.savez(f, **table._asdict())
    partial.rename(path)  # a crash mid-write never leaves a truncated table under the real name


def _load(path: epath.Path) -> TextTable:
    with path.open("rb") as f, np.load(f) as data:
        return TextTable(**{field: data[field] for field in TextTable._fields})


def compute_text_table(
    family: str,
    checkpoint_dir: str,
    captions: Sequence[str],
    *,
    max_len: int = MAX_LEN,
    batch_size: int = 64,
    param_dtype=jnp.float32,
    name: str = "encoder",
) -> TextTable:
    """Run the `family` encoder of `checkpoint_dir` over `captions` (no caching)."""
    if family not in ENCODER_FAMILIES:
        raise ValueError(f"Unknown encoder family {family!r}; known: {sorted(ENCODER_FAMILIES)}")
    load, encode = ENCODER_FAMILIES[family]
    config, params = load(checkpoint_dir, param_dtype)
    tokens = hf_tokenize(checkpoint_dir, captions, max_len)
    embeddings = encode_in_batches(
        lambda p, i, m: encode(config, p, i, m), params, tokens.ids, tokens.mask, batch_size=batch_size, name=name
    )
    return TextTable(embeddings, tokens.mask, tokens.ids, tokens.roles)


def cached_text_table(
    name: str,
    family: str,
    checkpoint_dir: str,
    captions: Sequence[str],
    workdir: Optional[str],
    *,
    max_len: int = MAX_LEN,
    batch_size: int = 64,
    param_dtype=jnp.float32,
) -> TextTable:
    """The text table of encoder `name`, read from workdir/text_cache when its fingerprint matches, else computed
    (and saved when workdir is given). The fingerprint covers captions, max_len, dtype and the checkpoint identity."""
    compute = lambda: compute_text_table(
        family, checkpoint_dir, captions, max_len=max_len, batch_size=batch_size, param_dtype=param_dtype, name=name
    )
    if workdir is None:
        logging.info("%s: no workdir, computing the text table without caching", name)
        return compute()
    fingerprint = _fingerprint(name, family, checkpoint_dir, captions, max_len, param_dtype)
    path = cache_path(workdir, name, fingerprint)
    if path.exists():
        logging.info("%s: text table cache hit %s", name, path)
        return _load(path)
    stale = sorted(p.name for p in path.parent.glob(f"{name}-*.npz")) if path.parent.exists() else []
    reason = f"fingerprint changed (found {stale})" if stale else "no cached table"
    logging.info("%s: %s; computing %d captions into %s", name, reason, len(captions), path)
    table = compute()
    _save(path, table)
    return table
