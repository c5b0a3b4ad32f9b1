"""Benchmark: evaluator speed and accuracy on fresh renders at 64 px and 128 px.

Speed: images/s of score_specs (detect + score) on clean 64 px renders (target >= 2,000). Accuracy per size:
overall-correct % on clean and on degraded renders (targets >= 99.5 and >= 98), and % of deliberately wrong captions
(another relation, swapped colours, a wrong shape) wrongly accepted (target <= 1). The last line of output is one JSON
object with all figures.

    python benchmarks/bench_eval.py [--n 10000] [--n128 10000] [--seed 0]
"""
import argparse
import json
import time

import numpy as np

from relcirc_jax.evaluation import score_specs
from relcirc_jax.evaluation.selfcheck import accuracy_report, random_scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="scenes per accuracy check at 64 px")
    parser.add_argument("--n128", type=int, default=10000, help="scenes per accuracy check at 128 px")
    parser.add_argument("--speed_n", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, specs = random_scenes(np.random.default_rng(args.seed), args.speed_n)
    score_specs(images[:64], specs[:64])  # warm-up
    start = time.perf_counter()
    score_specs(images, specs)
    images_per_s = args.speed_n / (time.perf_counter() - start)
    print(f"score_specs on {args.speed_n} clean 64 px images: {images_per_s:,.0f} images/s")

    figures = {"images_per_s": round(images_per_s)}
    for size, n in ((64, args.n), (128, args.n128)):
        report = accuracy_report(n, size=size, seed=args.seed)
        print(f"{size} px, {n} scenes: " + ", ".join(f"{k} {v}" for k, v in report.items()))
        figures.update({f"{k}_{size}px": v for k, v in report.items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
