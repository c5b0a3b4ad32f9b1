"""relcirc_jax.diffusion: the DDPM schedule, the training loss, ODE samplers and classifier-free guidance."""

from relcirc_jax.diffusion.guidance import cfg_denoiser_fn
from relcirc_jax.diffusion.losses import Noising, diffusion_loss, draw_noising, mse_loss, q_sample, sample_timesteps
from relcirc_jax.diffusion.parameterization import PREDICTIONS, eps_fn_from
from relcirc_jax.diffusion.samplers import SOLVERS, model_timesteps, sample, sample_trajectory, sample_with_aux
from relcirc_jax.diffusion.schedules import Schedule, linear_schedule

__all__ = [
    "Noising",
    "PREDICTIONS",
    "SOLVERS",
    "Schedule",
    "cfg_denoiser_fn",
    "diffusion_loss",
    "draw_noising",
    "eps_fn_from",
    "mse_loss",
    "linear_schedule",
    "model_timesteps",
    "q_sample",
    "sample",
    "sample_timesteps",
    "sample_trajectory",
    "sample_with_aux",
]
