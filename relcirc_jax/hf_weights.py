"""Read Hugging Face weight files into numpy arrays by tensor name: safetensors or PyTorch .bin, one file or the shards
that its `<file>.index.json` lists. The one reader of every checkpoint the package loads (T5 and BERT text encoders,
diffusers PixArt transformers, our own reference models); it imports nothing of the package and knows no network.

Tensors keep their stored dtype, bfloat16 included (as ml_dtypes.bfloat16, from either format); callers cast to their
parameter dtype (through float32, which holds every bfloat16 exactly).
"""

import json
import os
from collections.abc import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

# transformers' weight files in the order we look for them (safetensors first); each may be sharded instead, into the
# files listed by `<name>.index.json`.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_SUFFIX = ".index.json"

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


def weight_files(directory: str, names: Sequence[str] = HF_WEIGHT_FILES, fix: str = "") -> list[str]:
    """The weight files of the checkpoint in `directory`: for the first of `names` found, that file or the shards
    (sorted) that its .index.json lists. `fix` is added to the error raised when there is none."""
    for name in names:
        single = os.path.join(directory, name)
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(single + INDEX_SUFFIX):
            with open(single + INDEX_SUFFIX) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, shard) for shard in shards]
    raise FileNotFoundError(
        f"No weights in {directory!r}: expected {' or '.join(names)} (or its {INDEX_SUFFIX}); found "
        f"{sorted(os.listdir(directory))}.{fix}"
    )


def read_files(files: Iterable[str], keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """Every tensor in `files` (.safetensors, else PyTorch .bin) whose name passes `keep` (default: all)."""
    keep = keep or (lambda key: True)
    state: dict[str, np.ndarray] = {}
    for file in files:
        reader = _read_safetensors if file.endswith(".safetensors") else _read_torch_bin
        state.update(reader(file, keep))
    return state


def read_weights(
    directory: str, keep: Callable[[str], bool] | None = None, names: Sequence[str] = HF_WEIGHT_FILES
) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in `directory` (`weight_files`) whose name passes `keep` (default: all)."""
    return read_files(weight_files(directory, names), keep)


def _read_safetensors(file: str, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    # The format read directly (8-byte header length, JSON header, raw little-endian data) rather than through
    # safetensors' numpy reader, which resolves bfloat16 only once ml_dtypes has registered it with numpy (and not at
    # all in older releases). Tensors are memory-mapped, copied on use.
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
    # torch's .numpy() refuses bfloat16: hand over its bits as ml_dtypes.bfloat16, as the safetensors reader does.
    bits = lambda t: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return {key: bits(t) if t.dtype == torch.bfloat16 else t.numpy() for key, t in state.items() if keep(key)}
