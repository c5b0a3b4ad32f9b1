"""Read Hugging Face checkpoints from a local directory into numpy: config.json plus safetensors or pytorch .bin
weights, single-file or sharded (*.index.json). Shared by the T5 and BERT loaders; nothing here touches the network."""

import json
import os
from typing import Callable, Optional

import ml_dtypes
import numpy as np

# Weight files in the order we look for them; an index file means a sharded checkpoint.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


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


def weight_files(path: str) -> list[str]:
    """The weight files of the checkpoint in `path` (shards in index order), safetensors preferred over .bin."""
    for name in _WEIGHT_FILES:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if not name.endswith(".index.json"):
            return [full]
        with open(full) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, shard) for shard in shards]
    raise FileNotFoundError(
        f"No weights in {path!r}: expected one of {_WEIGHT_FILES} (found {sorted(os.listdir(path))})."
    )


# safetensors dtype tags -> numpy dtypes (bfloat16 via ml_dtypes, which numpy itself lacks).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(file: str, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    # Read the format directly (8-byte header length, JSON header, raw little-endian data): the safetensors numpy
    # reader rejects bfloat16, the dtype of many large checkpoints. Tensors are memory-mapped, copied on use.
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__" or not keep(key):
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file!r}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        tensors[key] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def _read_torch_bin(file: str, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"Reading {file!r} needs PyTorch: pip install torch (or convert it to safetensors).") from e
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    # numpy has no bfloat16: widen to float32 here and let the caller pick the parameter dtype.
    return {
        key: value.float().numpy() if value.is_floating_point() else value.numpy()
        for key, value in state.items()
        if keep(key)
    }


def read_weights(path: str, keep: Optional[Callable[[str], bool]] = None) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in `path` whose name passes `keep` (default: all), as numpy arrays by HF name.

    bfloat16 tensors come back as ml_dtypes.bfloat16 (safetensors) or float32 (.bin); callers cast to their param dtype.
    """
    keep = keep or (lambda key: True)
    state: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        reader = _read_safetensors if file.endswith(".safetensors") else _read_torch_bin
        state.update(reader(file, keep))
    return state


def checkpoint_fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint (config text, weight file names and sizes) for cache keys; weights unhashed."""
    parts = [json.dumps(read_config(path), sort_keys=True)]
    parts += [f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in weight_files(path)]
    return "\n".join(parts)


def dense_kernel(torch_linear_weight: np.ndarray, dtype) -> np.ndarray:
    """A torch nn.Linear weight [out, in] as a Flax Dense kernel [in, out]."""
    return np.asarray(torch_linear_weight, dtype=np.float32).T.astype(dtype)


def as_param(array: np.ndarray, dtype) -> np.ndarray:
    """A tensor as a parameter of `dtype` (via float32 so bfloat16 sources convert exactly)."""
    return np.asarray(array, dtype=np.float32).astype(dtype)
