"""Benchmark: scene generation throughput (sample centres with the overlap rule + render), numpy on the CPU.

Target: >= 20,000 images/s at 64 px. Also measured: the same with every layout drawn for a given (random) relation,
and the wall time of a whole training batch (dataset.train_batch: specs, captions, layouts, render, [-1, 1] floats)
at the trainer's batch sizes, which must stay far below a train step. The last line of output is one JSON object.

    python benchmarks/bench_data.py [--size 64] [--batch 1024] [--batches 20]
"""

import argparse
import json
import time

import numpy as np

from relcirc_jax.data import dataset, scenes
from relcirc_jax.data.spec import COLORS, RELATIONS, SHAPES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    if min(args.size, args.batch, args.batches) < 1:
        parser.error("--size, --batch and --batches must be >= 1")
    radius = args.size * 8 / 64
    rng = np.random.default_rng(0)

    def one_batch(given_relation):
        shape_idx = rng.integers(0, len(SHAPES), (args.batch, 2))
        color_idx = rng.integers(0, len(COLORS), (args.batch, 2))
        relation_idx = rng.integers(0, len(RELATIONS), args.batch) if given_relation else None
        centers = scenes.sample_centers(rng, shape_idx, size=args.size, radius=radius, relation_idx=relation_idx)
        return scenes.render(shape_idx, color_idx, centers, size=args.size, radius=radius)

    figures = {"size": args.size, "batch": args.batch}
    for given_relation, key in ((False, "images_per_s"), (True, "images_per_s_given_relation")):
        one_batch(given_relation)  # warm-up
        start = time.perf_counter()
        for _ in range(args.batches):
            one_batch(given_relation)
        seconds = time.perf_counter() - start
        figures[key] = round(args.batch * args.batches / seconds)
        print(
            f"{args.batches} batches of {args.batch} scenes at {args.size} px"
            f"{' for given relations' if given_relation else ''}: {seconds:.2f} s, {figures[key]:,} images/s"
        )
    for batch in (64, 256):
        dataset.train_batch(0, 0, global_batch=batch, size=args.size, radius=radius)  # warm the caption tables
        times = []
        for step in range(1, args.batches + 1):
            start = time.perf_counter()
            dataset.train_batch(0, step, global_batch=batch, size=args.size, radius=radius)
            times.append(time.perf_counter() - start)
        figures[f"train_batch_{batch}_ms"] = round(float(np.median(times)) * 1e3, 2)
        print(
            f"dataset.train_batch(global_batch={batch}) at {args.size} px: "
            f"{figures[f'train_batch_{batch}_ms']:.1f} ms median"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
