"""Helpers shared by the checkpoint, resume and multi-process tests: bitwise equality of state trees and the metric
rows a run wrote to workdir/metrics.jsonl."""

import json
import os

import jax
import numpy as np


def assert_bitwise_equal(a, b):
    """Every leaf of `a` and `b` has the same dtype, shape and bytes (so NaN == NaN and -0.0 != 0.0)."""
    leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def metric_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def metric_series(workdir, key) -> list[tuple[int, float]]:
    """(step, value) of every row of the run that has `key`."""
    return [(row["step"], row[key]) for row in metric_rows(workdir) if key in row]
