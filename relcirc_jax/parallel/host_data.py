"""Host numpy batches <-> global jax.Arrays sharded along the batch dimension over ("data", "fsdp").

`to_global` takes each process's own rows of the batch (training data, made by `local_rows`); `shared_to_global` takes
a batch every process holds whole (e.g. the captions to sample); `to_host` brings a sharded result back whole to every
process. All of them work the same with one process or many.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from relcirc_jax.parallel.rules import batch_sharding, batch_shards


def local_rows(
    mesh: Mesh, global_batch: int, make_slice: Callable[[int, int], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The rows of the global batch that this process's devices hold, in row order, as `to_global` takes them.

    `make_slice(k, n)` returns slice k of n equal slices of the global batch (rows k*B/n ... (k+1)*B/n), e.g.
    `dataset.train_batch(..., process_index=k, process_count=n)`. Which rows a process holds follows the mesh's
    device order, which need not put process 0's devices first (jax.make_mesh lays a TPU pod out by topology), so
    they are read off the batch sharding rather than assumed to be slice `jax.process_index()`; each contiguous,
    aligned run of them is one call (one call in all on a single process)."""
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"The global batch {global_batch} does not split over the {shards} data*fsdp shards. "
            f"Fix: make the global batch size a multiple of {shards}."
        )
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({index[0].start or 0 for index in index_map.values()})
    parts = [make_slice(k, n) for k, n in slice_calls(starts, global_batch // shards, global_batch)]
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def slice_calls(starts: list[int], size: int, global_batch: int) -> list[tuple[int, int]]:
    """(k, n) slice calls that cover the blocks [start, start + size) for the sorted `starts`, in order: a run of
    adjacent blocks is one call where it is an aligned slice of the batch, else one call per block."""
    calls, run = [], [starts[0]]
    for start in starts[1:] + [None]:
        if start is not None and start == run[-1] + size:
            run.append(start)
            continue
        length = len(run) * size
        aligned = run[0] % length == 0 and global_batch % length == 0
        calls += (
            [(run[0] // length, global_batch // length)]
            if aligned
            else [(s // size, global_batch // size) for s in run]
        )
        run = [start]
    return calls


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows of the batch into one global array per key.

    Every process passes its own `local_batch`: the rows its devices hold, in row order (`local_rows`); the global
    leading dim (local rows x process count) must split evenly over the data*fsdp shards.
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
