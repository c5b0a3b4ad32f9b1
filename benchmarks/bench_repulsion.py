"""Benchmark: what contextual repulsion and the diversity baselines add to sampling, each against plain CFG sampling
of the same model, batch and noises measured in the same run.

An MM-DiT parameter-matched to DiT-micro (random, perturbed weights), RTE captions of the paper's eval prompts in
groups of 4 images per prompt, DPM-Solver++ 14 steps with CFG 4.5, one compiled call per setting (no vmap, so a
switched-off branch costs nothing). Repulsion: eta 0.5 (scale-free), M = 50 inner steps, the first tau = 4 steps
(the paper's SD3.5 setting), every block with a text output. The paper reports +20-30 % per image (its Table 1: SD3.5-L
13.83 -> 18.12 s, Flux 10.34 -> 12.80 s for 4 images on an A100). Times are after compilation, best of --repeats.

Then the study's way of running a sweep (analysis/interventions.screen: `--sweep` settings vmapped in one compiled
call): a CFG-scale sweep, a contextual-repulsion eta sweep and an image-token-repulsion eta sweep (tau 4, all blocks),
per image and setting, against the CFG sweep. The repulsion's skip outside its window survives the vmap (its
predicate is reduced over the settings axis), so a sweep should cost about what its settings cost alone.
The last line of output is one JSON object with the figures.

    python benchmarks/bench_repulsion.py [--batch 64] [--repeats 3] [--size micro] [--sweep 4]
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_analysis import best_time, random_model

from relcirc_jax.analysis import interventions, repulsion
from relcirc_jax.config import SIZES
from relcirc_jax.train import evaluate, sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per call (groups of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="micro", choices=SIZES)
    parser.add_argument("--sweep", type=int, default=4, help="settings per vmapped sweep (0: skip the sweeps)")
    args = parser.parse_args()
    if args.batch < 4 or args.batch % 4 or args.repeats < 1 or args.sweep < 0:
        parser.error("--batch must be a positive multiple of 4 (groups of 4), --repeats >= 1 and --sweep >= 0")
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
    if args.sweep:
        figures["sweep"] = sweeps(model, captions, args.sweep, window)
    print(json.dumps(figures))


def sweeps(model, captions, num: int, window) -> dict:
    """ms per image and setting of `num`-setting vmapped sweeps (one chunk, one call each, timed after compiling)."""
    depth = model.model_cfg.depth
    etas = np.linspace(0.05, 1.0, num)

    def eta_sweep(target, blocks):
        rows = [repulsion.knobs(e, window, blocks) for e in etas]
        knobs = {k: np.stack([row[k] for row in rows]) for k in repulsion.KNOBS}
        return knobs, dict(repulsion=repulsion.RepulsionConfig(target=target))

    cases = {
        "CFG sweep": ({"cfg_scale": np.linspace(1.0, 8.0, num).astype(np.float32)}, {}),
        "contextual repulsion eta sweep": eta_sweep("text", repulsion.thirds(depth)["all"]),
        "image-token repulsion eta sweep": eta_sweep("image", np.ones(depth, np.float32)),
    }
    ms = {}
    for name, (knobs, kwargs) in cases.items():  # run_s excludes the compilation
        times = interventions.screen(model, captions, knobs, chunk=num, generate_kwargs=kwargs)[1]
        ms[name] = 1000 * times["run_s"] / (num * len(captions))
    print(f"Vmapped sweeps of {num} settings x {len(captions)} images (analysis/interventions.screen):")
    for name, value in ms.items():
        print(f"  {name:40s} {value:8.2f} ms/image/setting   x{value / ms['CFG sweep']:.3f} of the CFG sweep")
    return {"settings": num, "ms_per_image_setting": ms}


if __name__ == "__main__":
    main()
