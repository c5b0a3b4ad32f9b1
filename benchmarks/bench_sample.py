"""Benchmark: sample a batch with the micro DiT (DPM-Solver++ 2M, 14 steps, CFG 4.5) as ONE compiled call.

Prints compile time and images/s for JAX, then the same sampling with diffusers (PixArtTransformer2DModel of the
same size and weights + DPMSolverMultistepScheduler, torch CPU) on a smaller batch for reference, and the largest
difference between the two samplers' images on that batch. Random weights and random caption embeddings.
The last line of output is one JSON object with the figures.

    python benchmarks/bench_sample.py [--batch 256] [--torch_batch 16] [--steps 14] [--cfg 4.5]
"""

import argparse
import json
import time

import jax
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

from relcirc_jax.diffusion import cfg_denoiser_fn, sample
from relcirc_jax.models.convert import diffusers_config, flax_to_diffusers
from relcirc_jax.models.dit import DiT, dit_config, init_params, null_caption

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
    model = DiT(config)

    def run(params, noise, text, mask, null_text, null_mask):
        model_fn = lambda x, t, c, m: model.apply({"params": params}, x, t, c, m)  # noqa: E731
        return sample(cfg_denoiser_fn(model_fn, text, mask, null_text, null_mask, scale), noise, num_steps=num_steps)

    return jax.jit(run)


def torch_model(config, params):
    model = PixArtTransformer2DModel(**diffusers_config(config)).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in flax_to_diffusers(params).items()})
    return model


def torch_sample(model, noise, text, mask, null_text, num_steps, scale):
    """diffusers' PixArt pipeline loop (uncond first, as PixArtAlphaPipeline concatenates), NHWC in and out."""
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(noise).permute(0, 3, 1, 2)
    captions = torch.from_numpy(np.concatenate([null_text, text]))
    caption_mask = torch.from_numpy(np.concatenate([np.ones_like(mask), mask])).long()
    channels = noise.shape[-1]
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(
                torch.cat([x, x]),
                encoder_hidden_states=captions,
                timestep=t.expand(2 * len(x)),
                encoder_attention_mask=caption_mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            uncond, cond = out[:, :channels].chunk(2)
            x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return x.permute(0, 2, 3, 1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--torch_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--cfg", type=float, default=4.5)
    args = parser.parse_args()

    config = dit_config("micro")
    params = perturbed_params(config)
    noise, text, mask = random_inputs(config, args.batch)
    null_text, null_mask = (np.asarray(a) for a in null_caption(params, args.batch))
    inputs = (params, noise, text, mask, null_text, null_mask)

    start = time.perf_counter()
    compiled = jax_sampler(config, args.steps, args.cfg).lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    images = np.asarray(jax.block_until_ready(compiled(*inputs)))
    jax_s = time.perf_counter() - start
    print(
        f"jax  ({jax.devices()[0].platform}, batch {args.batch}): compile {compile_s:.1f} s, "
        f"sample {jax_s:.1f} s, {args.batch / jax_s:.2f} images/s"
    )

    n = min(args.torch_batch, args.batch)
    model = torch_model(config, params)
    torch_inputs = (noise[:n], text[:n], mask[:n], null_text[:n])
    torch_sample(model, *torch_inputs, 1, args.cfg)  # warm-up: first calls of torch kernels are slow
    start = time.perf_counter()
    reference = torch_sample(model, *torch_inputs, args.steps, args.cfg)
    torch_s = time.perf_counter() - start
    max_diff = float(np.abs(images[:n] - reference).max())
    relative_diff = max_diff / float(np.abs(reference).max())
    print(
        f"diffusers (torch CPU, {torch.get_num_threads()} threads, batch {n}): sample {torch_s:.1f} s, "
        f"{n / torch_s:.2f} images/s; max |jax - diffusers| = {max_diff:.2e} "
        f"({relative_diff:.1e} of the largest pixel; random weights give unbounded images)"
    )
    print(
        json.dumps(
            dict(
                model="micro",
                solver="dpmpp_2m",
                steps=args.steps,
                cfg=args.cfg,
                platform=jax.devices()[0].platform,
                jax_batch=args.batch,
                jax_compile_s=round(compile_s, 2),
                jax_sample_s=round(jax_s, 2),
                jax_images_per_s=round(args.batch / jax_s, 3),
                torch_batch=n,
                torch_sample_s=round(torch_s, 2),
                torch_images_per_s=round(n / torch_s, 3),
                max_abs_diff_vs_diffusers=max_diff,
                max_rel_diff_vs_diffusers=relative_diff,
            )
        )
    )


if __name__ == "__main__":
    main()
