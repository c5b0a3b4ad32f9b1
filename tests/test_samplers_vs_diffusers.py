"""Samplers vs diffusers' schedulers (torch CPU) driven by the same closed-form eps function; CFG; sampler API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from relcirc_jax.diffusion import cfg_denoiser_fn, sample, sample_trajectory
from relcirc_jax.diffusion.schedules import alphas_cumprod

# PixArt-alpha/PixArt-XL-2-512x512 scheduler/scheduler_config.json (diffusers 0.22 wrote it; fields it lacks,
# such as final_sigmas_type, take the installed diffusers' defaults).
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    timestep_spacing="linspace",
    steps_offset=0,
)

RTOL = 1e-5


def make_scheduler(solver):
    dpm = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)
    if solver == "dpmpp_2m":
        return dpm
    if solver == "ddim":
        return DDIMScheduler.from_config(dpm.config, clip_sample=False)
    return EulerDiscreteScheduler.from_config(dpm.config)


def eps_torch(x, t):
    return 0.97 * x + 0.05 * torch.sin(t / 100.0 + 3.0 * x)


def eps_jax(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.97 * x + 0.05 * jnp.sin(t / 100.0 + 3.0 * x)


def diffusers_trajectory(solver, noise, num_steps, *, float64_schedule=False):
    """(timesteps given to the model, sample after each step) from diffusers' pipeline loop.

    float64_schedule swaps diffusers' float32 abar for ours (float64), so both sides share one schedule.
    """
    scheduler = make_scheduler(solver)
    if float64_schedule:
        scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod())
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    seen_t, samples = [], []
    for t in scheduler.timesteps:
        seen_t.append(float(t))
        eps = eps_torch(scheduler.scale_model_input(x, t), t.to(torch.float32))
        x = scheduler.step(eps, t, x).prev_sample
        samples.append(x.numpy())
    return np.array(seen_t), np.stack(samples)


def max_rel_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)


# Stock diffusers (float32 abar) for the step counts we use. With 1 step, DDIM and Euler evaluate only t = 0,
# where diffusers' float32 1 - abar loses ~1e-4 relative precision (Euler-1 then differs by 8e-5), so the
# float64_schedule variant checks the same algorithms on one shared schedule, 1 step included.
@pytest.mark.parametrize("num_steps, float64_schedule", [(14, False), (50, False), (1, True), (14, True), (50, True)])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "euler"])
def test_trajectory_matches_diffusers(solver, num_steps, float64_schedule, noise):
    expected_t, expected_samples = diffusers_trajectory(solver, noise, num_steps, float64_schedule=float64_schedule)
    run = jax.jit(lambda z: sample_trajectory(eps_jax, z, solver=solver, num_steps=num_steps))
    x0, timesteps, samples = run(jnp.asarray(noise))

    np.testing.assert_array_equal(np.asarray(timesteps), expected_t)
    step_errors = [max_rel_error(samples[i], expected_samples[i]) for i in range(num_steps)]
    assert max(step_errors) <= RTOL, step_errors
    assert max_rel_error(x0, expected_samples[-1]) <= RTOL


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "euler"])
def test_model_receives_diffusers_timesteps_per_example(solver, noise):
    expected_t, _ = diffusers_trajectory(solver, noise, 14)
    seen = []

    def recording_eps(x, t):
        seen.append(np.asarray(t))
        return eps_jax(x, t)

    with jax.disable_jit():  # the scan runs eagerly, so the eps function sees concrete timesteps
        sample(recording_eps, jnp.asarray(noise), solver=solver, num_steps=14)
    assert all(t.shape == (noise.shape[0],) and t.dtype == np.float32 for t in seen)
    np.testing.assert_array_equal(np.stack(seen)[:, 0], expected_t.astype(np.float32))


def test_sample_is_jittable_vmappable_and_deterministic(noise):
    run = jax.jit(lambda z: sample(eps_jax, z, num_steps=5))
    batched = jnp.asarray(noise)
    np.testing.assert_array_equal(run(batched), run(batched))
    per_image = jax.vmap(lambda z: run(z[None])[0])(batched)
    np.testing.assert_allclose(per_image, run(batched), rtol=1e-6, atol=1e-6)


def test_batch_sharding_is_kept_across_devices():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    noise = jax.device_put(jnp.ones((len(jax.devices()), 2, 2, 3)), batch_sharding)
    out = jax.jit(lambda z: sample(eps_jax, z, num_steps=3))(noise)
    assert out.sharding.is_equivalent_to(batch_sharding, out.ndim)
    np.testing.assert_allclose(out, sample(eps_jax, jnp.ones(noise.shape), num_steps=3), rtol=1e-6)


def test_learned_sigma_output_uses_first_channels(noise):
    with_sigma = lambda x, t: jnp.concatenate([eps_jax(x, t), 100.0 * jnp.ones_like(x)], axis=-1)  # noqa: E731
    np.testing.assert_array_equal(
        sample(with_sigma, jnp.asarray(noise), num_steps=4), sample(eps_jax, jnp.asarray(noise), num_steps=4)
    )


def test_bad_solver_and_steps_raise():
    with pytest.raises(ValueError, match="Unknown solver 'dpm'.*ddim.*dpmpp_2m.*euler"):
        sample(eps_jax, jnp.zeros((1, 2, 2, 3)), solver="dpm")
    for bad in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match="num_steps must be an integer"):
            sample(eps_jax, jnp.zeros((1, 2, 2, 3)), num_steps=bad)
    with pytest.raises(ValueError, match="eps_fn returned 5 channels"):
        sample(lambda x, t: jnp.zeros(x.shape[:-1] + (5,)), jnp.zeros((1, 2, 2, 3)))


def toy_model(x, t, text, mask):
    """Output depends on x, t and the masked mean of the caption; 2C channels like a learned-sigma DiT."""
    caption = (text * mask[..., None]).sum(axis=(1, 2)) / jnp.maximum(mask.sum(axis=1), 1.0)
    scale = caption.reshape((-1,) + (1,) * (x.ndim - 1))
    eps = scale * x + jnp.sin(t / 100.0).reshape(scale.shape)
    return jnp.concatenate([eps, -eps], axis=-1)


def test_cfg_guides_first_channels_in_one_batched_call():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    t = jnp.array([10.0, 500.0, 999.0], jnp.float32)
    text = jnp.asarray(rng.standard_normal((3, 5, 7)), jnp.float32)
    mask = jnp.ones((3, 5), jnp.float32)
    null_text, null_mask = jnp.zeros((1, 5, 7)), jnp.ones((1, 5))
    batch_sizes = []

    def counting_model(*args):
        batch_sizes.append(args[0].shape[0])
        return toy_model(*args)

    guided = cfg_denoiser_fn(counting_model, text, mask, null_text, null_mask, 4.5)(x, t)
    assert batch_sizes == [6]
    cond = toy_model(x, t, text, mask)
    uncond = toy_model(x, t, jnp.zeros_like(text), jnp.ones_like(mask))
    np.testing.assert_allclose(guided[..., :2], uncond[..., :2] + 4.5 * (cond[..., :2] - uncond[..., :2]), rtol=1e-6)
    np.testing.assert_array_equal(guided[..., 2:], cond[..., 2:])


def test_cfg_scale_one_is_the_conditional_model_and_samples_under_jit():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 2)), jnp.float32)
    text, mask = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32), jnp.ones((2, 5))
    eps_fn = cfg_denoiser_fn(toy_model, text, mask, jnp.zeros((2, 5, 7)), jnp.ones((2, 5)), 1.0)
    t = jnp.full((2,), 300.0)
    np.testing.assert_allclose(eps_fn(x, t), toy_model(x, t, text, mask), rtol=1e-6, atol=1e-6)
    out = jax.jit(lambda z: sample(eps_fn, z, num_steps=3))(x)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
