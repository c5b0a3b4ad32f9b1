"""v- and x0-prediction: training targets, and sampling vs diffusers (prediction_type "v_prediction" / "sample") driven
by the same closed form read as that prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from test_samplers_vs_diffusers import PIXART_SCHEDULER_CONFIG, eps_jax, eps_torch, make_scheduler, max_rel_error

from relcirc_jax.diffusion import Noising, diffusion_loss, draw_noising, eps_fn_from, sample
from relcirc_jax.diffusion.parameterization import training_target
from relcirc_jax.diffusion.schedules import alphas_cumprod


def test_v_target_matches_diffusers_get_velocity():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    expected = (
        DDPMScheduler(
            **{
                k: PIXART_SCHEDULER_CONFIG[k]
                for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
            }
        )
        .get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        .numpy()
    )
    abar = alphas_cumprod()[t].reshape(-1, 1, 1, 1)
    ours = training_target("v", jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(abar, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(ours), expected, rtol=1e-5, atol=1e-5
    )  # diffusers computes sqrt(1-abar) in float32


def test_v_loss_is_zero_for_the_oracle_v():
    x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 3))
    t = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 1000)
    noise = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    abar = jnp.asarray(alphas_cumprod(), jnp.float32)[t].reshape(-1, 1, 1, 1)
    v = jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0  # the perfect v-predictor for these draws
    loss, _ = diffusion_loss(lambda x_t, tt: v, x0, Noising(t, noise), prediction="v")
    assert float(loss) < 1e-10
    with pytest.raises(ValueError, match="prediction type"):
        diffusion_loss(lambda x_t, tt: v, x0, Noising(t, noise), prediction="sample")


def test_x0_loss_is_zero_for_the_oracle_x0_and_the_target_is_x0():
    x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 3))
    loss, _ = diffusion_loss(lambda x_t, tt: x0, x0, draw_noising(jax.random.PRNGKey(1), x0.shape), prediction="x0")
    assert float(loss) == 0.0
    assert training_target("x0", x0, jnp.zeros_like(x0), jnp.full((8, 1, 1, 1), 0.5)) is x0


@pytest.mark.parametrize("prediction,diffusers_name", [("v", "v_prediction"), ("x0", "sample")])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "euler"])
def test_model_samples_match_diffusers_prediction_type(solver, prediction, diffusers_name):
    noise = np.random.default_rng(3).normal(size=(2, 4, 4, 3)).astype(np.float32)
    scheduler = make_scheduler(solver)
    scheduler = type(scheduler).from_config(scheduler.config, prediction_type=diffusers_name)
    scheduler.set_timesteps(14)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = eps_torch(scheduler.scale_model_input(x, t), t.to(torch.float32))  # the closed form, read as `prediction`
        x = scheduler.step(out, t, x).prev_sample
    ours = sample(eps_fn_from(eps_jax, prediction), jnp.asarray(noise), solver=solver, num_steps=14)
    assert max_rel_error(ours, x.numpy()) <= 1e-5
