"""Wall time of dataset.train_batch per global batch (single process) at 64 and 128 px; last line is JSON.

Usage: python benchmarks/dataset_throughput.py [--repeats 20]
"""
import argparse
import json
import time

import numpy as np

from relcirc_jax.data import dataset


def _median_ms(repeats: int, **kwargs) -> float:
    dataset.train_batch(0, 0, **kwargs)  # warm the caption tables
    times = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        dataset.train_batch(0, step, **kwargs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    figures = {}
    for size, radius in ((64, 8), (128, 16)):
        for batch in (64, 256):
            ms = _median_ms(args.repeats, global_batch=batch, size=size, radius=radius)
            figures[f"ms_per_batch_{batch}_at_{size}px"] = round(ms, 2)
            print(f"train_batch global_batch={batch} size={size}: {ms:.1f} ms median ({batch / ms * 1e3:.0f} images/s)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
