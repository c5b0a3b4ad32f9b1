"""Benchmark: what contextual repulsion and the diversity baselines add to sampling, each against plain CFG sampling
of the same model, batch and noises measured in the same run.

An MM-DiT parameter-matched to DiT-micro (random, perturbed weights), RTE captions of the paper's eval prompts in
groups of 4 images per prompt, DPM-Solver++ 14 steps with CFG 4.5, one compiled call per setting (no vmap, so a
switched-off branch costs nothing). Repulsion: eta 0.5 (scale-free), M = 50 inner steps, the first tau = 4 steps
(the paper's SD3.5 setting), every block with a text output. The paper reports +20-30 % per image (its Table 1: SD3.5-L
13.83 -> 18.12 s, Flux 10.34 -> 12.80 s for 4 images on an A100). Times are after compilation, best of --repeats.
The last line of output is one JSON object with the figures.

    python benchmarks/bench_repulsion.py [--batch 64] [--repeats 3] [--size micro]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_analysis import best_time, random_model

from relcirc_jax.analysis import repulsion
from relcirc_jax.train import evaluate, sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per call (groups of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="micro")
    args = parser.parse_args()
    model = random_model(args.size, f"/tmp/bench_repulsion_{args.size}", model_arch="mmdit")
    prompts = evaluate.eval_prompt_list(model.config)
    captions = [p for p in prompts[: args.batch // 4] for _ in range(4)]
    batch = {k: jnp.asarray(v) for k, v in sampling.caption_batch(captions).items()}
    noise_id = jnp.arange(len(captions))
    settings = sampling.eval_settings(model.config)
    eval_config, depth = model.config.eval, model.model_cfg.depth
    window = repulsion.first_steps_window(eval_config.solver, eval_config.num_steps, 4)
    cases = {
        "plain": ({}, {}),
        "repulsion eta 0 (compiled in, off)": (
            dict(repulsion=repulsion.RepulsionConfig()),
            repulsion.knobs(0.0, window, repulsion.thirds(depth)["all"]),
        ),
        "repulsion eta 0.5, tau 4, M 50": (
            dict(repulsion=repulsion.RepulsionConfig()),
            repulsion.knobs(0.5, window, repulsion.thirds(depth)["all"]),
        ),
        "repulsion eta 0.5, tau 4, M 10": (
            dict(repulsion=repulsion.RepulsionConfig(inner_steps=10)),
            repulsion.knobs(0.5, window, repulsion.thirds(depth)["all"]),
        ),
        "image-token repulsion eta 0.5, tau 4": (
            dict(repulsion=repulsion.RepulsionConfig(target="image")),
            repulsion.knobs(0.5, window, np.ones(depth)),
        ),
        "particle guidance coeff 30": ({}, {"pg_coeff": np.float32(30.0)}),
        "CADS s 0.25": ({}, {"cads": np.float32([0.25, 0.3, 0.8, 1.0])}),
    }
    seconds = {}
    for name, (kwargs, knobs) in cases.items():
        generate = jax.jit(sampling.generate_fn(model.model_cfg, model.conditioner, **settings, **kwargs))
        knobs = {k: jnp.asarray(v) for k, v in knobs.items()}
        seconds[name] = best_time(lambda: generate(model.params, batch, model.tables, noise_id, knobs), args.repeats)
    base = seconds["plain"]
    print(f"MM-DiT-{args.size} (random weights), {len(captions)} images, {settings['solver']} {settings['num_steps']} "
          f"steps, CFG {settings['cfg_scale']}, on {jax.devices()[0].platform} x{jax.device_count()}:")  # fmt: skip
    for name, s in seconds.items():
        per_image = 1000 * s / len(captions)
        print(f"  {name:40s} {per_image:8.2f} ms/image   x{s / base:.3f} of plain ({100 * (s / base - 1):+.1f} %)")
    figures = {
        "images": len(captions),
        "ms_per_image": {k: 1000 * v / len(captions) for k, v in seconds.items()},
        "ratio_to_plain": {k: v / base for k, v in seconds.items()},
        "paper_overhead_pct": [20, 30],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
