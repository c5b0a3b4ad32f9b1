"""Host numpy batches <-> global jax.Arrays sharded along the batch dimension over ("data", "fsdp").

`to_global` takes each process's own slice of the batch (training data); `shared_to_global` takes a batch every process
holds whole (e.g. the captions to sample); `to_host` brings a sharded result back whole to every process. All three
work the same with one process or many.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from relcirc_jax.parallel.rules import batch_sharding, batch_shards


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array per key.

    Every process passes its own `local_batch` (leading dim = global batch / process count); the global leading
    dim must split evenly over the data*fsdp shards.
    """
    sharding = batch_sharding(mesh)
    shards = batch_shards(mesh)
    return {key: _to_global_array(key, np.asarray(value), sharding, shards) for key, value in local_batch.items()}


def _to_global_array(key: str, local: np.ndarray, sharding: NamedSharding, shards: int) -> jax.Array:
    if local.ndim == 0:
        raise ValueError(f"Batch entry {key!r} is a scalar; every entry needs a leading batch dimension.")
    global_batch = local.shape[0] * jax.process_count()
    if global_batch % shards:
        raise ValueError(
            f"Batch entry {key!r} has local shape {local.shape}, so the global batch is {global_batch}, "
            f"which does not split over the {shards} data*fsdp shards. "
            f"Fix: make the global batch size a multiple of {shards}."
        )
    global_shape = (global_batch, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def shared_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Batch-sharded global arrays from a batch that every process holds in full (each device takes its rows)."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_callback(np.shape(value), sharding, lambda index, v=value: np.asarray(v)[index])
        for key, value in batch.items()
    }


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of `array` as numpy on every process, gathering the shards other processes hold."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
