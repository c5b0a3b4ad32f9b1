"""Benchmark: evaluator speed and accuracy on fresh renders at 64 px and 128 px.

Speed: images/s of score_specs (detect + score) on clean 64 px renders (target >= 2,000), beside the paper's OpenCV
detector (evaluation/paper_detector.py) scoring the same images in the same run. Accuracy per size:
overall-correct % on clean and on degraded renders (targets >= 99.5 and >= 98), and % of deliberately wrong captions
(another relation, swapped colours, a wrong shape) wrongly accepted (target <= 1). Robustness on an independent
renderer (tests/independent_scenes.py, the generator of tests/test_evaluator_independent.py: PIL, its own blur, cast
and noise, each object's radius jittered +-20 %, triangles anchored at their centroid or bounding-box centre): % of
true captions accepted (target >= 98) and % of each wrong kind (colours swapped, a shape replaced, the opposite
relation; target <= 1) at 64 / 128 px x clean / degraded x anchor. The last line of output is one JSON object with
all figures.

    python benchmarks/bench_eval.py [--n 10000] [--n128 10000] [--robust_n 1000] [--speed_n 4096] [--seed 0]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from relcirc_jax.evaluation import score_specs
from relcirc_jax.evaluation.selfcheck import accuracy_report, random_scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import independent_scenes  # noqa: E402  (the test suite's independent renderer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="scenes per accuracy check at 64 px")
    parser.add_argument("--n128", type=int, default=10000, help="scenes per accuracy check at 128 px")
    parser.add_argument("--robust_n", type=int, default=1000, help="independent-renderer scenes per combo")
    parser.add_argument("--speed_n", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.n, args.n128, args.robust_n, args.speed_n) < 1:
        parser.error("--n, --n128, --robust_n and --speed_n must be >= 1")

    images, specs = random_scenes(np.random.default_rng(args.seed), args.speed_n)
    speed = {}
    for detector in ("relcirc", "paper"):  # the paper's OpenCV contour detector is the reference, same run
        score_specs(images[:64], specs[:64], detector=detector)  # warm-up
        start = time.perf_counter()
        score_specs(images, specs, detector=detector)
        speed[detector] = args.speed_n / (time.perf_counter() - start)
        print(
            f"score_specs (detector={detector}) on {args.speed_n} clean 64 px images: {speed[detector]:,.0f} images/s"
        )
    print(f"this project's evaluator is {speed['relcirc'] / speed['paper']:.2f}x the paper's detector's speed")

    figures = {"images_per_s": round(speed["relcirc"]), "paper_detector_images_per_s": round(speed["paper"])}
    for size, n in ((64, args.n), (128, args.n128)):
        report = accuracy_report(n, size=size, seed=args.seed)
        print(f"{size} px, {n} scenes: " + ", ".join(f"{k} {v}" for k, v in report.items()))
        figures.update({f"{k}_{size}px": v for k, v in report.items()})

    print(
        f"\nIndependent renderer, +-{independent_scenes.JITTER:.0%} radius jitter, {args.robust_n} scenes per row: "
        "% of true captions accepted, % of wrong ones accepted"
    )
    kinds = independent_scenes.WRONG_KINDS
    print(f"{'combo':26s} {'correct':>8s}" + "".join(f" {'wrong ' + kind:>15s}" for kind in kinds))
    for combo, row in independent_scenes.robustness_report(args.robust_n, seed=args.seed).items():
        print(f"{combo:26s} {row['correct_pct']:8.2f}" + "".join(f" {row[f'wrong_{k}_pct']:15.2f}" for k in kinds))
        figures.update({f"independent_{combo}_{key}": value for key, value in row.items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
