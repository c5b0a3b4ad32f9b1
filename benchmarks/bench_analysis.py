"""Benchmark: what the circuit analyses cost, each against its reference measured in the same run.

1. synopsis capture: one 14-step DPM-Solver++ CFG sampling pass that reduces every self- and cross-attention pattern
   inside the solver scan, vs the same sampling without capture (target <= 1.3x).
2. single-head ablation screen over every head of DiT-mini: one compiled vmap over head masks, `--ablation_chunks`
   masks per call (each value a row; 0 = all masks in one call), vs calling the compiled sampler once per head from
   Python, same images (target >= 5x). Both do the same matmuls (analytic count, models/flops.py), so the loop's
   achieved FLOP/s over the machine's matmul peak (bench_train's) bounds what any schedule of that work can gain
   over it.
3. qk_screen of every DiT-B cross-attention head (target < 1 s).
Random (perturbed) weights, RTE captions of the paper's eval prompts. Times are after compilation, best of --repeats.
The model sizes are flags so that a test can run the whole script small. The last line of output is one JSON object
with the figures.

    python benchmarks/bench_analysis.py [--synopsis_batch 64] [--ablation_batch 8] [--ablation_chunks 0,8] [--repeats 2]
"""

import argparse
import json
import time

import jax
import numpy as np
from bench_train import matmul_peak_flops

from relcirc_jax.analysis import ablation, capture, context, groups, qk_screen, synopsis
from relcirc_jax.config import SIZES, base_config
from relcirc_jax.models import arch, flops
from relcirc_jax.train import evaluate, sampling
from relcirc_jax.train import state as train_state


def random_model(size: str, workdir: str, seed: int = 0, model_arch: str = "pixart") -> context.AnalysisModel:
    """A model of `size` (and arch) with fresh weights plus small noise (zero-initialised output layers would draw
    nothing)."""
    config = base_config("rte", size, arch=model_arch)
    model_cfg = train_state.model_config(config, caption_channels=config.text.dim)
    params = arch.init_params(model_cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return context.from_params(config, jax.device_get(params), workdir, f"random {model_arch} {size}")


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def bench_synopsis(size: str, batch: int, repeats: int) -> dict:
    model = random_model(size, f"/tmp/bench_analysis_{size}")
    captions = (evaluate.eval_prompt_list(model.config) * batch)[:batch]
    roles = groups.token_roles(model.conditioner, captions)
    token_groups = np.random.default_rng(0).dirichlet(np.ones(3), (len(captions), 64)).astype(np.float32)
    extra = lambda padded: {"roles": roles, "groups": token_groups}  # noqa: E731 - batch = len(captions)
    plain = capture.sampler(model, batch)
    captured = capture.sampler(
        model, batch, synopsis.attention_names(model.model_cfg), synopsis.reduce_attention, extra
    )
    plain_s = best_time(lambda: plain(model.params, model.tables, captions), repeats)
    capture_s = best_time(lambda: captured(model.params, model.tables, captions)[0], repeats)
    print(f"synopsis: plain sampling {plain_s:.2f} s, capture pass {capture_s:.2f} s for {batch} images ({size})")
    return {"synopsis_plain_s": plain_s, "synopsis_capture_s": capture_s, "synopsis_ratio": capture_s / plain_s}


def bench_ablation(size: str, batch: int, chunks: list[int], repeats: int) -> dict:
    model = random_model(size, f"/tmp/bench_analysis_{size}")
    cfg = model.model_cfg
    captions = (evaluate.eval_prompt_list(model.config) * batch)[:batch]
    masks = ablation.single_head_masks(cfg.depth, cfg.num_heads)
    chunks = [chunk or len(masks) for chunk in chunks]
    screens = {}
    for chunk in chunks:
        # _screen compiles on each call and reports compilation and sampling apart.
        timings = [ablation._screen(model, captions, masks, mode="zero", chunk=chunk)[1] for _ in range(repeats)]
        screens[chunk] = {key: min(t[key] for t in timings) for key in ("run_s", "compile_s")}
    generate = sampling.generate_fn(cfg, model.conditioner, **sampling.eval_settings(model.config))
    one_call = jax.jit(generate)
    batch_in = {k: jax.numpy.asarray(v) for k, v in sampling.caption_batch(captions).items()}
    noise_id = jax.numpy.arange(len(captions), dtype=jax.numpy.int32)

    def loop():
        return [
            one_call(model.params, batch_in, model.tables, noise_id, {"self_head_mask": m[0], "cross_head_mask": m[1]})
            for m in masks
        ]

    loop_s = best_time(loop, repeats)
    # Every sampler step runs the model on both CFG halves: 2 x batch images.
    work = len(masks) * sampling.eval_settings(model.config)["num_steps"] * flops.forward_flops(cfg, 2 * batch)
    peak = max(matmul_peak_flops(2048 if jax.default_backend() == "cpu" else 8192, dtypes=("float32",)).values())
    loop_share = work / loop_s / peak
    print(
        f"ablation: {len(masks)} masks x {batch} images ({size}), {work / 1e12:.2f} TFLOP of matmuls; Python loop of "
        f"compiled calls {loop_s:.2f} s = {work / loop_s / 1e9:.1f} GFLOP/s, matmul peak {peak / 1e9:.1f}: the loop "
        f"runs at {100 * loop_share:.0f} % of peak, so no schedule of this work beats it by more than "
        f"{1 / loop_share:.1f}x here"
    )
    for chunk, timing in screens.items():
        print(
            f"  vmapped screen, {chunk} masks per call: {timing['run_s']:.2f} s = {work / timing['run_s'] / 1e9:.1f} "
            f"GFLOP/s (compile {timing['compile_s']:.1f} s), x{loop_s / timing['run_s']:.2f} the loop"
        )
    best = min(screens, key=lambda chunk: screens[chunk]["run_s"])
    return {"ablation_masks": len(masks), "ablation_loop_s": loop_s, "ablation_best_chunk": best,
            "ablation_screen_s": screens[best]["run_s"], "ablation_speedup": loop_s / screens[best]["run_s"],
            "ablation_screen_s_by_chunk": {str(c): round(t["run_s"], 4) for c, t in screens.items()},
            "ablation_tflop": work / 1e12, "matmul_peak_gflops": peak / 1e9,
            "ablation_loop_fraction_of_peak": loop_share, "ablation_speedup_bound": 1 / loop_share}  # fmt: skip


def bench_qk_screen(size: str, repeats: int) -> dict:
    model = random_model(size, f"/tmp/bench_analysis_{size}")
    seconds = best_time(
        lambda: qk_screen.screen(model.params, model.model_cfg, model.conditioner, model.tables), repeats
    )
    heads = model.model_cfg.depth * model.model_cfg.num_heads
    print(f"qk_screen: all {heads} cross-attention heads of DiT-{size} in {seconds:.3f} s")
    return {"qk_screen_s": seconds, "qk_screen_size": size, "qk_screen_heads": heads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synopsis_batch", type=int, default=64)
    parser.add_argument("--ablation_batch", type=int, default=8)
    parser.add_argument("--ablation_chunks", default="0,8", help="masks per compiled call, comma-separated; 0 = all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--synopsis_size", default="micro", choices=SIZES)
    parser.add_argument("--ablation_size", default="mini", choices=SIZES)
    parser.add_argument("--qk_size", default="b", choices=SIZES)
    args = parser.parse_args()
    if min(args.synopsis_batch, args.ablation_batch, args.repeats) < 1:
        parser.error("--synopsis_batch, --ablation_batch and --repeats must be >= 1")
    try:
        chunks = [int(chunk) for chunk in args.ablation_chunks.split(",")]
    except ValueError:
        chunks = [-1]
    if min(chunks) < 0:
        parser.error(f"--ablation_chunks={args.ablation_chunks}: give whole numbers >= 0 separated by commas, e.g. 0,8")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} devices)")
    figures = {}
    figures.update(bench_synopsis(args.synopsis_size, args.synopsis_batch, args.repeats))
    figures.update(bench_ablation(args.ablation_size, args.ablation_batch, chunks, args.repeats))
    figures.update(bench_qk_screen(args.qk_size, args.repeats))
    figures["platform"] = jax.devices()[0].platform
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
