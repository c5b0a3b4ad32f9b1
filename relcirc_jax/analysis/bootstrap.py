"""Cluster bootstrap: resampling weights that draw whole clusters (e.g. all images of one prompt) at once."""

from collections.abc import Sequence

import numpy as np


def resample_indices(num: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """int [num_resamples, num]: in each resample, `num` cluster indices drawn with replacement (numpy Generator seeded
    `seed`; one seed, one set of draws: what pairs the intervals of estimates computed on the same clusters)."""
    return np.random.default_rng(seed).integers(0, num, (num_resamples, num))


def cluster_weights(clusters: Sequence, num_resamples: int, seed: int = 0) -> np.ndarray:
    """float64 [num_resamples, N]: how often each of N items is drawn in each resample, when a resample draws as many
    clusters as there are, with replacement, and takes all their items (items with equal labels in `clusters` form a
    cluster; the draws of `resample_indices`)."""
    ids = np.unique(np.asarray(clusters).astype(str), return_inverse=True)[1].reshape(-1)
    num = int(ids.max()) + 1
    picks = resample_indices(num, num_resamples, seed)
    offsets = num * np.arange(num_resamples)[:, None]
    counts = np.bincount((picks + offsets).reshape(-1), minlength=num_resamples * num).reshape(num_resamples, num)
    return counts[:, ids].astype(np.float64)
