"""Benchmark: sample a batch with the micro DiT (DPM-Solver++ 2M, 14 steps, CFG 4.5) as ONE compiled call, against
diffusers sampling the same batch with the same weights, in float32 and in bfloat16.

JAX: the DiT computing in each dtype (`DiTConfig.dtype`; float32 weights and solver), compile time and images/s.
diffusers: PixArtTransformer2DModel of the same size and weights + DPMSolverMultistepScheduler in diffusers' pipeline
loop, float32 and under bf16 autocast, on the same hardware (the CPU, or the GPU when JAX runs on one), same batch,
after a one-step warm-up. Also the largest difference between JAX's and diffusers' float32 images (the numerics
check) and how far each framework's bf16 images are from its own float32 ones. Random weights and random caption
embeddings. The last line of output is one JSON object with the figures.

    python benchmarks/bench_sample.py [--batch 64] [--steps 14] [--cfg 4.5] [--dtypes float32,bfloat16]
                                      [--cpu_devices 2]

On a CPU, JAX samples data-parallel over `--cpu_devices` XLA devices that split the host, as the `:cpu` configs'
evaluations do (`parallel.cpu_devices`; the bf16 gemm library's products run one core per device).
"""

import argparse
import json
import time

import jax
import numpy as np
import torch
from bench_train import torch_device
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.diffusion import cfg_denoiser_fn, sample
from relcirc_jax.models.convert import diffusers_config, flax_to_diffusers
from relcirc_jax.models.dit import DiT, dit_config, init_params, null_caption
from relcirc_jax.parallel.mesh import make_mesh

# PixArt-alpha/PixArt-XL-2-512x512's scheduler config (see relcirc_jax/diffusion/samplers.py).
PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
    steps_offset=0,
    prediction_type="epsilon",
)


def random_inputs(config, batch, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, config.image_size, config.image_size, config.in_channels), np.float32)
    text = rng.standard_normal((batch, config.max_text_len, config.caption_channels), np.float32)
    return noise, text, np.ones((batch, config.max_text_len), bool)


def perturbed_params(config, seed=0):
    """Fresh params plus small noise, so zero-initialised output layers do not make every eps zero."""
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def jax_sampler(config, num_steps, scale):
    model = DiT(config)  # config.dtype is the compute dtype

    def run(params, noise, text, mask, null_text, null_mask):
        model_fn = lambda x, t, c, m: model.apply({"params": params}, x, t, c, m)  # noqa: E731
        return sample(cfg_denoiser_fn(model_fn, text, mask, null_text, null_mask, scale), noise, num_steps=num_steps)

    return jax.jit(run)


def torch_model(config, params):
    model = PixArtTransformer2DModel(**diffusers_config(config)).to(torch_device()).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in flax_to_diffusers(params).items()})
    return model


def torch_sample(model, noise, text, mask, null_text, num_steps, scale, dtype="float32"):
    """diffusers' PixArt pipeline loop (uncond first, as PixArtAlphaPipeline concatenates), NHWC in and out; the
    model runs under bf16 autocast when `dtype` is "bfloat16"."""
    device = torch_device()
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    scheduler.set_timesteps(num_steps, device=device)
    x = torch.from_numpy(noise).permute(0, 3, 1, 2).to(device)
    captions = torch.from_numpy(np.concatenate([null_text, text])).to(device)
    caption_mask = torch.from_numpy(np.concatenate([np.ones_like(mask), mask])).long().to(device)
    channels = noise.shape[-1]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        for t in scheduler.timesteps:
            out = model(
                torch.cat([x, x]),
                encoder_hidden_states=captions,
                timestep=t.expand(2 * len(x)),
                encoder_attention_mask=caption_mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample.float()
            uncond, cond = out[:, :channels].chunk(2)
            x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of both frameworks")
    parser.add_argument("--cpu_devices", type=int, default=2, help="XLA devices the host CPU is split into")
    args = parser.parse_args()
    if min(args.batch, args.steps, args.cpu_devices) < 1 or not set(args.dtypes.split(",")) <= {"float32", "bfloat16"}:
        parser.error(
            "--batch, --steps and --cpu_devices must be >= 1 and --dtypes a comma-separated list of float32, bfloat16"
        )
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.batch % len(jax.devices()):
        parser.error(f"--batch {args.batch} must be a multiple of the {len(jax.devices())} devices")
    dtypes = args.dtypes.split(",")
    rows_sharded = NamedSharding(make_mesh({"data": -1}), P("data"))

    params = perturbed_params(dit_config("micro"))
    noise, text, mask = random_inputs(dit_config("micro"), args.batch)
    null_text, null_mask = (np.asarray(a) for a in null_caption(params, args.batch))
    inputs = (params, *(jax.device_put(a, rows_sharded) for a in (noise, text, mask, null_text, null_mask)))
    model = torch_model(dit_config("micro"), params)
    torch_inputs = (noise, text, mask, null_text)
    rows, images = {}, {}
    for dtype in dtypes:
        sampler = jax_sampler(dit_config("micro", dtype=dtype), args.steps, args.cfg)
        compiled, compile_s = _timed(lambda: sampler.lower(*inputs).compile())
        images[f"jax_{dtype}"], jax_s = _timed(lambda: np.asarray(jax.block_until_ready(compiled(*inputs))))
        torch_sample(model, *torch_inputs, 1, args.cfg, dtype)  # warm-up: first calls of torch kernels are slow
        images[f"torch_{dtype}"], torch_s = _timed(
            lambda: torch_sample(model, *torch_inputs, args.steps, args.cfg, dtype)
        )
        rows[dtype] = dict(
            jax_compile_s=round(compile_s, 2),
            jax_sample_s=round(jax_s, 2),
            jax_images_per_s=round(args.batch / jax_s, 3),
            torch_sample_s=round(torch_s, 2),
            torch_images_per_s=round(args.batch / torch_s, 3),
            jax_vs_torch=round(torch_s / jax_s, 3),
        )
        print(
            f"{dtype}, batch {args.batch}: jax ({len(jax.devices())} {jax.devices()[0].platform} devices) "
            f"compile {compile_s:.1f} s, sample "
            f"{jax_s:.1f} s, {args.batch / jax_s:.2f} images/s | diffusers (torch {torch_device()}, "
            f"{torch.get_num_threads()} threads) {torch_s:.1f} s, {args.batch / torch_s:.2f} images/s | "
            f"jax x{torch_s / jax_s:.2f}",
            flush=True,
        )
    scale = float(np.abs(images["torch_float32"]).max()) if "float32" in dtypes else 1.0
    differences = {}
    if "float32" in dtypes:
        differences["jax_float32_vs_torch_float32"] = float(
            np.abs(images["jax_float32"] - images["torch_float32"]).max()
        )
        for framework in ("jax", "torch"):
            if "bfloat16" in dtypes:
                bf16, f32 = images[f"{framework}_bfloat16"], images[f"{framework}_float32"]
                differences[f"{framework}_bfloat16_vs_float32"] = float(np.abs(bf16 - f32).max())
    for name, value in differences.items():
        print(f"max |{name.replace('_vs_', ' - ')}| = {value:.2e} ({value / scale:.1e} of the largest pixel)")
    print(
        json.dumps(
            dict(
                model="micro",
                solver="dpmpp_2m",
                steps=args.steps,
                cfg=args.cfg,
                platform=jax.devices()[0].platform,
                devices=len(jax.devices()),
                batch=args.batch,
                rows=rows,
                max_abs_diff=differences,
                largest_pixel=scale,
            )
        )
    )


if __name__ == "__main__":
    main()
