"""Benchmark: training throughput (images/s) of the real compiled train step vs the same model trained with PyTorch,
in float32 and in bfloat16.

For each DiT size and batch: our AOT-compiled train step (RTE text, caption dropout, diffusion loss, clip + AdamW,
EMA) on one fixed batch of real scenes, computing in float32 and in bfloat16 (`train.compute_dtype`: float32 master
weights, Adam state, EMA and loss), and diffusers' PixArtTransformer2DModel of the same size (in_channels 3,
sample_size 64, patch 8, caption_channels 4096) with the same loss, clipping, torch AdamW and an EMA, in float32 and
under bf16 autocast, same batch, on the same hardware (all CPU cores, or the GPU when JAX runs on one). The four take
turns (an untimed then a timed step each, per round) and each time is the median over the rounds, so the ratios hold
on a machine shared with other jobs (the 1-minute load average is reported).

FLOPs per step are the analytic matmul count (models/flops.py; XLA's GPU cost analysis leaves out cuBLAS calls); on a
CPU XLA's own count is printed beside it as a check. Achieved FLOP/s are a fraction of the machine's measured matmul
peak: the fastest of one 2048x2048 (CPU) or 8192x8192 (accelerator) matmul in JAX and torch in the `--dtypes` timed.
Data generation is not timed (see bench_data.py). The last line of output is one JSON object with the figures.

    python benchmarks/bench_train.py [--sizes nano,micro,mini] [--batches 64,256] [--dtypes float32,bfloat16]
                                     [--steps 3] [--batch_b 32] [--cpu_devices 2] [--microbatch 32]

On a CPU, JAX runs data-parallel over `--cpu_devices` XLA devices that split the host (the `:cpu` configs'
`parallel.cpu_devices`); XLA's cost analysis counts one device's share, so its FLOPs are scaled by the device count.
A batch larger than `--microbatch` images is also timed as that many-image microbatches (`train.microbatches`,
columns `jax_<dtype>_mb<N>`): the same update, and on a CPU a faster one (default 32 there; none on an accelerator).
"""

import argparse
import json
import os
import statistics
import time

import jax
import torch
from diffusers import PixArtTransformer2DModel
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.config import SIZES, base_config
from relcirc_jax.data import dataset
from relcirc_jax.diffusion.schedules import alphas_cumprod
from relcirc_jax.models import cpu_bf16_matmul, flops
from relcirc_jax.models.convert import diffusers_config
from relcirc_jax.parallel.host_data import to_global
from relcirc_jax.parallel.mesh import make_mesh
from relcirc_jax.train import state as train_state
from relcirc_jax.train import step as train_step

DTYPES = ("float32", "bfloat16")


def matmul_peak_flops(n: int, dtypes=DTYPES, repeats: int = 10, budget_s: float = 5.0) -> dict:
    """Best FLOP/s of one n x n matmul in each framework and of `dtypes` over up to `repeats` timed runs, fewer once
    they have taken `budget_s` (PyTorch's bf16 on a CPU without bf16 instructions: a minute per matmul). The
    machine's matmul ceiling is the largest: on a CPU with AMX or AVX512-BF16 that is a bf16 one. JAX's product is
    the Dense layers' (`cpu_bf16_matmul.matmul`: oneMKL or oneDNN for bf16 where it is on), its rows split over all
    devices."""
    device = torch_device()
    rows = NamedSharding(make_mesh({"data": -1}), P("data"))

    def best_seconds(run):
        run()  # the first calls after start-up run slow
        times = []
        while len(times) < repeats and sum(times) < budget_s:
            times.append(_seconds(run))
        return min(times)

    peaks = {}
    for dtype in dtypes:
        a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), rows)
        matmul = jax.jit(lambda x, y: cpu_bf16_matmul.matmul(x, y).astype(x.dtype))
        peaks[f"jax_{dtype}"] = 2 * n**3 / best_seconds(lambda: matmul(a, a).block_until_ready())
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

        def torch_matmul():
            b @ b
            if device == "cuda":
                torch.cuda.synchronize()

        peaks[f"torch_{dtype}"] = 2 * n**3 / best_seconds(torch_matmul)
    return peaks


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_train(size: str, batch_size: int, workdir: str, dtype: str = "float32", microbatches: int = 1) -> dict:
    """Our compiled train step for DiT-`size` at `batch_size` computing in `dtype` (float32 master weights, Adam
    state, EMA and loss), its gradient accumulated over `microbatches`: a `step()` to time, its analytic and
    XLA-counted FLOPs, compile time."""
    config = base_config("rte", size)
    config.train.batch_size = batch_size
    config.train.compute_dtype = dtype
    config.train.microbatches = microbatches
    setup = train_state.build_run_setup(config, workdir)
    local = dataset.train_batch(0, 0, global_batch=batch_size)
    batch = to_global({k: local[k] for k in train_step.STEP_BATCH_KEYS}, setup.mesh)
    start = time.perf_counter()
    compiled = train_step.compile_train_step(setup, batch)
    compile_s = time.perf_counter() - start
    carry = {"state": train_state.initial_state(setup)}

    def step():
        carry["state"], metrics = compiled(carry["state"], batch, setup.tables, None)
        jax.block_until_ready((carry["state"], metrics))

    setup.checkpointer.close()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "step": step,
        "compile_s": compile_s,
        "flops_per_step": flops.train_step_flops(setup.model_cfg, batch_size),
        "xla_flops_per_step": float(cost["flops"]) * setup.mesh.size,
        "model_cfg": setup.model_cfg,
    }


def torch_device() -> str:
    """The GPU when JAX runs on one (so both frameworks use the same accelerator), else the CPU."""
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_train(model_cfg, batch_size: int, dtype: str = "float32"):
    """A `step()` of the same DiT in diffusers + torch AdamW with the same loss, clipping and EMA; `dtype`
    "bfloat16" runs the forward and backward under bf16 autocast (float32 weights, optimizer and EMA)."""
    torch.manual_seed(0)
    device = torch_device()
    model = PixArtTransformer2DModel(**diffusers_config(model_cfg)).to(device).train()
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=3e-2, eps=1e-10)
    schedule = torch.from_numpy(alphas_cumprod()).float().to(device)
    size = model_cfg.image_size
    x0 = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    text = torch.randn(batch_size, model_cfg.max_text_len, model_cfg.caption_channels, device=device) * 0.1
    mask = torch.ones(batch_size, model_cfg.max_text_len, dtype=torch.long, device=device)

    def step():
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        a = schedule[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(
                x_t,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def alternating_step_seconds(steps: dict, rounds: int, slow_s: float = 30.0) -> dict:
    """Median seconds per step of each callable over `rounds` rounds; in each round every callable runs one untimed
    step and then one timed step, so a timed step never starts while the other framework's idle threads still spin
    (measured: a JAX step right after a torch step takes up to 1.9x as long). A callable whose step took over
    `slow_s` is timed once only (PyTorch's bf16 on a CPU without bf16 matrix instructions: minutes per step)."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if times[name] and times[name][0] > slow_s:
                continue
            step()
            times[name].append(_seconds(step))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 64,256") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="nano,micro,mini")
    parser.add_argument("--batches", type=_int_list, default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="compute dtypes of both frameworks")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework and dtype (after one warm-up)")
    parser.add_argument("--batch_b", type=int, default=32, help="batch for DiT-B (CPU memory and time)")
    parser.add_argument("--workdir", default="/tmp/bench_train", help="for the text conditioner and checkpointer")
    parser.add_argument("--cpu_devices", type=int, default=2, help="XLA devices the host CPU is split into")
    parser.add_argument(
        "--microbatch", type=int, help="images per microbatch of the extra JAX columns (default: 32 on a CPU; 0: none)"
    )
    args = parser.parse_args()
    if not set(args.sizes.split(",")) <= set(SIZES) or not set(args.dtypes.split(",")) <= set(DTYPES):
        parser.error(f"--sizes takes a comma-separated list of {SIZES}, --dtypes of {DTYPES}")
    if min(args.batches + [args.steps, args.batch_b, args.cpu_devices]) < 1:
        parser.error("--batches, --steps, --batch_b and --cpu_devices must be >= 1")
    batches = {size: [args.batch_b] if size == "b" else args.batches for size in args.sizes.split(",")}
    timed = {batch for size_batches in batches.values() for batch in size_batches}
    if args.microbatch is not None and (
        args.microbatch < 0 or any(b > args.microbatch > 0 and b % args.microbatch for b in timed)
    ):
        parser.error(f"--microbatch {args.microbatch} must divide every batch larger than it, or be 0 (none)")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.microbatch is None:
        args.microbatch = 32 if jax.default_backend() == "cpu" else 0
    torch.set_num_threads(os.cpu_count())
    dtypes = args.dtypes.split(",")
    peaks = matmul_peak_flops(2048 if jax.default_backend() == "cpu" else 8192, dtypes)
    peak = max(peaks.values())
    print(
        f"devices: {jax.devices()}; torch on {torch_device()} ({torch.get_num_threads()} threads); matmul peaks "
        + ", ".join(f"{name} {flops_s / 1e9:.1f}" for name, flops_s in peaks.items())
        + " GFLOP/s"
    )
    matrix_units = cpu_bf16_matmul.status() if jax.default_backend() == "cpu" else (False, "not a CPU")
    print(f"JAX bfloat16 Dense products: {matrix_units[1] if matrix_units[0] else f'XLA ({matrix_units[1]})'}")
    results = {
        "matmul_peak_gflops": {name: flops_s / 1e9 for name, flops_s in peaks.items()},
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "jax_bf16_gemm_library": matrix_units[1] if matrix_units[0] else None,
        "rows": [],
    }
    for size, size_batches in batches.items():
        for batch_size in size_batches:
            ours = {dtype: jax_train(size, batch_size, args.workdir, dtype) for dtype in dtypes}
            if args.microbatch and batch_size > args.microbatch:
                microbatches = batch_size // args.microbatch
                ours |= {
                    f"{dtype}_mb{args.microbatch}": jax_train(size, batch_size, args.workdir, dtype, microbatches)
                    for dtype in dtypes
                }
            model_cfg, step_flops = ours[dtypes[0]]["model_cfg"], ours[dtypes[0]]["flops_per_step"]
            steps = {f"jax_{name}": run["step"] for name, run in ours.items()}
            steps |= {f"torch_{dtype}": torch_train(model_cfg, batch_size, dtype) for dtype in dtypes}
            seconds = alternating_step_seconds(steps, args.steps)
            best_torch = min(seconds[f"torch_{dtype}"] for dtype in dtypes)
            row = {
                "size": size,
                "batch": batch_size,
                "gflops_per_step": step_flops / 1e9,
                "xla_cpu_gflops_per_step": ours[dtypes[0]]["xla_flops_per_step"] / 1e9
                if jax.default_backend() == "cpu"
                else None,
                "images_per_s": {name: batch_size / s for name, s in seconds.items()},
                "fraction_of_peak": {name: step_flops / s / peak for name, s in seconds.items()},
                "jax_compile_s": {name: run["compile_s"] for name, run in ours.items()},
                "best_jax_vs_best_torch": best_torch / min(seconds[f"jax_{name}"] for name in ours),
                "load_average_1min": os.getloadavg()[0],
            }
            results["rows"].append(row)
            print(
                f"DiT-{size} batch {batch_size} ({row['gflops_per_step']:.1f} GFLOP/step): "
                + " | ".join(
                    f"{name} {row['images_per_s'][name]:.1f} img/s ({100 * row['fraction_of_peak'][name]:.0f}%)"
                    for name in seconds
                )
                + f" | best JAX / best torch x{row['best_jax_vs_best_torch']:.2f}"
                + f" | load {row['load_average_1min']:.1f}",
                flush=True,
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
