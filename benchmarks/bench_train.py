"""Benchmark: training throughput (images/s) of the real compiled train step vs the same model trained with PyTorch.

For each DiT size: our AOT-compiled train step (RTE text, caption dropout, diffusion loss, clip + AdamW, EMA) on one
fixed batch of real scenes, and diffusers' PixArtTransformer2DModel of the same size (in_channels 3, sample_size 64,
patch 8, caption_channels 4096) with the same loss, clipping, torch AdamW and an EMA, same batch size, on the same
hardware (all CPU cores, or the GPU when JAX runs on one). The two frameworks take turns (two JAX steps, two torch
steps, ...; only the second of each pair is timed) and each time is the median over the rounds, so the ratio holds on
a machine shared with other jobs (the 1-minute load average is reported). Also the step's FLOPs from XLA's cost
analysis and the achieved FLOP/s as a fraction of the measured f32 matmul peak (one jnp matmul, 2048x2048 on a CPU,
8192x8192 on an accelerator, default precision). Data generation is not timed (see bench_data.py). The last line of
output is one JSON object with the figures.

    python benchmarks/bench_train.py [--sizes nano,micro,mini,b] [--steps 5] [--batch 256] [--batch_b 32]
                                     [--cpu_devices 2]

On a CPU, JAX runs data-parallel over `--cpu_devices` XLA devices that split the host (the `:cpu` configs'
`parallel.cpu_devices`); XLA's cost analysis counts one device's share, so the FLOPs are scaled by the device count.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import torch
from diffusers import PixArtTransformer2DModel

from relcirc_jax.config import base_config
from relcirc_jax.data import dataset
from relcirc_jax.diffusion.schedules import alphas_cumprod
from relcirc_jax.models.convert import diffusers_config
from relcirc_jax.parallel.host_data import to_global
from relcirc_jax.train import state as train_state
from relcirc_jax.train import step as train_step


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` f32 FLOP/s of one n x n jnp matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = min(_seconds(lambda: matmul(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_train(size: str, batch_size: int, workdir: str) -> dict:
    """Our compiled train step for DiT-`size` at `batch_size`: a `step()` to time, its FLOPs, compile time."""
    config = base_config("rte", size)
    config.train.batch_size = batch_size
    setup = train_state.build_run_setup(config, workdir)
    local = dataset.train_batch(0, 0, global_batch=batch_size)
    batch = to_global({k: local[k] for k in train_step.STEP_BATCH_KEYS}, setup.mesh)
    start = time.perf_counter()
    compiled = train_step.compile_train_step(setup, batch)
    compile_s = time.perf_counter() - start
    init = jax.jit(train_state.init_state, static_argnums=(0, 1, 2), out_shardings=setup.state_shardings)
    carry = {"state": init(setup.model_cfg, setup.tx, 0)}

    def step():
        carry["state"], metrics = compiled(carry["state"], batch, setup.tables)
        jax.block_until_ready((carry["state"], metrics))

    setup.checkpointer.close()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "step": step,
        "compile_s": compile_s,
        "flops_per_step": float(cost["flops"]) * setup.mesh.size,
        "model_cfg": setup.model_cfg,
    }


def torch_device() -> str:
    """The GPU when JAX runs on one (so both frameworks use the same accelerator), else the CPU."""
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_train(model_cfg, batch_size: int):
    """A `step()` of the same DiT in diffusers + torch AdamW with the same loss, clipping and EMA."""
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
        out = model(
            x_t,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        loss = torch.nn.functional.mse_loss(out, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def alternating_step_seconds(steps: dict, rounds: int) -> dict:
    """Median seconds per step of each callable over `rounds` rounds; in each round every callable runs one untimed
    step and then one timed step, so a timed step never starts while the other framework's idle threads still spin
    (measured: a JAX step right after a torch step takes up to 1.9x as long)."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            times[name].append(_seconds(step))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="nano,micro,mini,b")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework (after one warm-up)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch_b", type=int, default=32, help="batch for DiT-B (CPU memory and time)")
    parser.add_argument("--workdir", default="/tmp/bench_train", help="for the text conditioner and checkpointer")
    parser.add_argument("--cpu_devices", type=int, default=2, help="XLA devices the host CPU is split into")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    torch.set_num_threads(os.cpu_count())
    peak = matmul_peak_flops(2048 if jax.default_backend() == "cpu" else 8192)
    print(
        f"devices: {jax.devices()}; torch on {torch_device()} ({torch.get_num_threads()} threads); "
        f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    results = {
        "matmul_peak_gflops": peak / 1e9,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "sizes": {},
    }
    for size in args.sizes.split(","):
        batch_size = args.batch_b if size == "b" else args.batch
        ours = jax_train(size, batch_size, args.workdir)
        theirs = torch_train(ours["model_cfg"], batch_size)
        seconds = alternating_step_seconds({"jax": ours["step"], "torch": theirs}, args.steps)
        achieved = ours["flops_per_step"] / seconds["jax"]
        row = {
            "batch": batch_size,
            "jax_images_per_s": batch_size / seconds["jax"],
            "jax_step_s": seconds["jax"],
            "jax_compile_s": ours["compile_s"],
            "torch_images_per_s": batch_size / seconds["torch"],
            "torch_step_s": seconds["torch"],
            "speedup_vs_torch": seconds["torch"] / seconds["jax"],
            "gflops_per_step": ours["flops_per_step"] / 1e9,
            "achieved_gflops": achieved / 1e9,
            "fraction_of_peak": achieved / peak,
            "load_average_1min": os.getloadavg()[0],
        }
        results["sizes"][size] = row
        print(
            f"DiT-{size} batch {batch_size}: JAX {row['jax_images_per_s']:.1f} img/s "
            f"({row['jax_step_s']:.2f} s/step, compile {row['jax_compile_s']:.1f} s) | "
            f"torch {row['torch_images_per_s']:.1f} img/s ({row['torch_step_s']:.2f} s/step) | "
            f"x{row['speedup_vs_torch']:.2f} | "
            f"{row['gflops_per_step']:.1f} GFLOP/step, {row['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * row['fraction_of_peak']:.0f}% of matmul peak | load {row['load_average_1min']:.1f}",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
