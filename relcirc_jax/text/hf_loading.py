"""Hugging Face text-encoder checkpoints in a local directory -> Flax parameters: the config.json, the load path that
the T5 and BERT loaders share, and the tensor conversions they use. The weight files are read by relcirc_jax.hf_weights.
"""

import dataclasses
import hashlib
import json
import os
from typing import Callable

import numpy as np

from relcirc_jax import hf_weights


def read_config(path: str) -> dict:
    """The checkpoint's config.json as a dict; a clear error when the directory or the file is missing."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"No config.json in {path!r}: point at a local Hugging Face checkpoint directory "
            "(the folder that save_pretrained wrote, with config.json and model weights)."
        )
    with open(config_file) as f:
        return json.load(f)


def config_from_hf(cls, hf_config: dict):
    """The config dataclass `cls` from a transformers config.json dict: the keys that name its fields (missing ones
    keep their defaults, the rest are ignored). Each encoder's `from_hf` checks what it supports, then calls this."""
    return cls(**{f.name: hf_config[f.name] for f in dataclasses.fields(cls) if f.name in hf_config})


def load_encoder(path: str, config_cls, params_from_state: Callable, keep: Callable[[str], bool], dtype) -> tuple:
    """(config, params) of the encoder in the local checkpoint directory `path`: `config_cls.from_hf` of its
    config.json, then `params_from_state(config, tensors, dtype)` of the weights whose names pass `keep`."""
    config = config_cls.from_hf(read_config(path))
    return config, params_from_state(config, hf_weights.read_weights(path, keep), dtype)


# The files a Hugging Face tokenizer reads: the ids, mask and roles a text cache stores come from them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "vocab.txt",
)
_WEIGHT_SAMPLES, _SAMPLE_BYTES = 64, 4096  # a strided content sample: cheap on a 19 GB T5-XXL


def checkpoint_fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint for cache keys: its config text, the tokenizer files (hashed whole) and each
    weight file's name, size, modification time and a strided sample of its bytes (new weights of the same shapes
    saved over old ones change it)."""
    parts = [json.dumps(read_config(path), sort_keys=True)]
    for file in hf_weights.weight_files(path):
        size = os.path.getsize(file)
        offsets = sorted({size * k // _WEIGHT_SAMPLES for k in range(_WEIGHT_SAMPLES)})
        parts.append(f"{os.path.basename(file)}:{size}:{os.stat(file).st_mtime_ns}:{_digest(file, offsets)}")
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            parts.append(f"{name}:{_digest(file, [0], chunk=os.path.getsize(file))}")
    return "\n".join(parts)


def _digest(file: str, offsets, chunk: int = _SAMPLE_BYTES) -> str:
    """sha256 (hex, 16 digits) of `chunk` bytes of `file` at each offset."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def dense_kernel(torch_linear_weight: np.ndarray, dtype) -> np.ndarray:
    """A torch nn.Linear weight [out, in] as a Flax Dense kernel [in, out]."""
    return np.asarray(torch_linear_weight, dtype=np.float32).T.astype(dtype)


def as_param(array: np.ndarray, dtype) -> np.ndarray:
    """A tensor as a parameter of `dtype` (via float32 so bfloat16 sources convert exactly)."""
    return np.asarray(array, dtype=np.float32).astype(dtype)
