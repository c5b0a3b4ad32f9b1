"""ODE samplers for the eps-prediction DDPM schedule: DPM-Solver++ 2M, DDIM (eta=0) and Euler, each one lax.scan.

Each solver is a *plan* (numpy float64 per-step coefficients, built once at trace time from num_steps) and a scan
body (float32 array maths), so the jitted sampler has no Python loop over steps, no host callbacks, and is a
pure function of the noise. The step rules and timestep spacing reproduce diffusers' schedulers configured as
PixArt-alpha's pipeline ships them (PixArt-alpha/PixArt-XL-2-512x512 scheduler/scheduler_config.json, written by
diffusers 0.22):

  DPMSolverMultistepScheduler: num_train_timesteps 1000, beta_schedule "linear", beta_start 1e-4, beta_end 0.02,
    prediction_type "epsilon", algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint",
    lower_order_final true, euler_at_final false, use_karras_sigmas false, use_lu_lambdas false,
    thresholding false, lambda_min_clipped -inf, variance_type null, timestep_spacing "linspace", steps_offset 0.
    The file predates final_sigmas_type, so diffusers' default "zero" applies: the last step jumps to sigma = 0,
    always first order (the model's x0 prediction), whatever num_steps is.
  DDIMScheduler.from_config(that config): timestep_spacing "linspace", steps_offset 0, set_alpha_to_one true,
    eta 0; clip_sample false (we set it: DDIMScheduler's default true would clip x0 predictions, which the ODE
    solvers above do not do). diffusers' DDIM steps from t to t - 1000 // num_steps (not to the next linspace
    timestep) and to abar = 1 below t = 0; we do the same.
  EulerDiscreteScheduler.from_config(that config): timestep_spacing "linspace" (fractional float timesteps, which
    the model receives as they are), interpolation "linear", final_sigmas_type "zero"; the initial noise is scaled
    by init_noise_sigma = the largest sigma, and the model input by 1 / sqrt(sigma^2 + 1).

The schedule differs from diffusers' in one way: we compute abar in float64 (as PixArt/IDDPM train with); diffusers
computes it in float32. With float32 sampling maths both ways, tests/test_samplers_vs_diffusers.py finds every
intermediate sample within ~1.5e-6 (relative to the largest value) of stock diffusers for 14 and 50 steps; only
a 1-step DDIM/Euler run (which evaluates t = 0 alone, where float32 1 - abar keeps ~4 digits) differs by ~1e-4.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from relcirc_jax.diffusion.schedules import NUM_TRAIN_TIMESTEPS, alphas_cumprod, ve_sigmas

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


class Plan(NamedTuple):
    """Per-step inputs of one solver: timesteps the model sees [N] and coefficient arrays [N] (float64)."""

    timesteps: np.ndarray
    coefficients: dict
    init_noise_scale: float


def _linspace_timesteps(num_steps: int, *, keep_zero: bool) -> np.ndarray:
    """diffusers' "linspace" spacing, descending: with keep_zero it ends at t=0 (DDIM), else it drops t=0 (DPM)."""
    if keep_zero:
        return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps).round()[::-1].astype(np.int64)
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def dpmpp_2m_plan(num_steps: int) -> Plan:
    """DPM-Solver++ (data prediction) multistep, 2nd order midpoint; 1st order on the first and last step.

    With s = VE sigma, alpha = 1/sqrt(1+s^2), sigma = s*alpha, lambda = -log s, step i maps x to
      ratio_i * x + gain_i * (x0_i + k_i * (x0_i - x0_{i-1})),
    ratio = sigma_{i+1}/sigma_i, gain = alpha_{i+1} (1 - exp(-h_i)), h_i = lambda_{i+1} - lambda_i,
    k_i = h_i / (2 (lambda_i - lambda_{i-1})) for 2nd-order steps, 0 for 1st-order ones.
    """
    timesteps = _linspace_timesteps(num_steps, keep_zero=False)
    s = np.append(ve_sigmas()[timesteps], 0.0)
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    sigma = s * alpha
    exp_neg_h = s[1:] / s[:-1]  # exp(-(lambda_{i+1} - lambda_i)); 0 on the final step to sigma = 0
    k = np.zeros(num_steps)
    second_order = np.arange(1, num_steps - 1)  # step 0 has no history; the last step (to sigma 0) is 1st order
    log_s = np.log(s[:-1])
    h = log_s[second_order] - log_s[second_order + 1]
    h_prev = log_s[second_order - 1] - log_s[second_order]
    k[second_order] = h / (2.0 * h_prev)
    coefficients = dict(
        alpha=alpha[:-1], sigma=sigma[:-1], ratio=sigma[1:] / sigma[:-1], gain=alpha[1:] * (1.0 - exp_neg_h), k=k
    )
    return Plan(timesteps, coefficients, 1.0)


def ddim_plan(num_steps: int) -> Plan:
    """Deterministic DDIM: x0 = (x - sqrt(1-a_t) eps)/sqrt(a_t); x <- sqrt(a_prev) x0 + sqrt(1-a_prev) eps."""
    timesteps = _linspace_timesteps(num_steps, keep_zero=True)
    abar = alphas_cumprod()
    prev = timesteps - NUM_TRAIN_TIMESTEPS // num_steps
    abar_t = abar[timesteps]
    abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
    coefficients = dict(
        sqrt_abar=np.sqrt(abar_t),
        sqrt_one_minus_abar=np.sqrt(1.0 - abar_t),
        sqrt_abar_prev=np.sqrt(abar_prev),
        sqrt_one_minus_abar_prev=np.sqrt(1.0 - abar_prev),
    )
    return Plan(timesteps, coefficients, 1.0)


def euler_plan(num_steps: int) -> Plan:
    """Euler on the VE ODE dx/ds = eps: the state is x_VP * sqrt(1+s^2); x <- x + (s_{i+1} - s_i) eps."""
    timesteps = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps, dtype=np.float32)[::-1].astype(np.float64)
    train_sigmas = ve_sigmas()
    s = np.append(np.interp(timesteps, np.arange(NUM_TRAIN_TIMESTEPS), train_sigmas), 0.0)
    coefficients = dict(input_scale=1.0 / np.sqrt(s[:-1] ** 2 + 1.0), ds=s[1:] - s[:-1])
    return Plan(timesteps, coefficients, float(s[0]))


def _dpmpp_2m_step(carry, x, eps, c):
    prev_x0 = carry
    x0 = (x - c["sigma"] * eps) / c["alpha"]
    x_next = c["ratio"] * x + c["gain"] * (x0 + c["k"] * (x0 - prev_x0))
    return x0, x_next


def _ddim_step(carry, x, eps, c):
    x0 = (x - c["sqrt_one_minus_abar"] * eps) / c["sqrt_abar"]
    return carry, c["sqrt_abar_prev"] * x0 + c["sqrt_one_minus_abar_prev"] * eps


def _euler_step(carry, x, eps, c):
    return carry, x + c["ds"] * eps


def _euler_model_input(x, c):
    return x * c["input_scale"]


def _identity_model_input(x, c):
    return x


class _Solver(NamedTuple):
    plan: Callable[[int], Plan]
    step: Callable
    model_input: Callable


SOLVERS = {
    "dpmpp_2m": _Solver(dpmpp_2m_plan, _dpmpp_2m_step, _identity_model_input),
    "ddim": _Solver(ddim_plan, _ddim_step, _identity_model_input),
    "euler": _Solver(euler_plan, _euler_step, _euler_model_input),
}


def _validated(solver: str, num_steps: int) -> _Solver:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {sorted(SOLVERS)}.")
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be an integer in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps!r}.")
    return SOLVERS[solver]


def _eps(eps_fn: EpsFn, x: jax.Array, t: jax.Array, has_aux: bool = False):
    """The model's eps for x (and its aux with has_aux); of a learned-sigma output (2C channels) only the first C."""
    out = eps_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    out, aux = out if has_aux else (out, None)
    channels = x.shape[-1]
    if out.shape[-1] not in (channels, 2 * channels):
        raise ValueError(
            f"eps_fn returned {out.shape[-1]} channels for a {channels}-channel sample; it must return {channels} "
            f"(eps) or {2 * channels} (eps and learned sigma)."
        )
    return out[..., :channels].astype(x.dtype), aux


def model_timesteps(solver: str, num_steps: int) -> np.ndarray:
    """The timesteps the model sees, one per solver step in sampling order (float32 [num_steps], descending)."""
    return np.asarray(_validated(solver, num_steps).plan(num_steps).timesteps, np.float32)


def sample_trajectory(
    eps_fn: EpsFn, noise: jax.Array, *, solver: str = "dpmpp_2m", num_steps: int = 14
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Like sample, also returning the timesteps the model saw [N] and the sample after each step [N, *noise.shape].

    For euler the per-step samples are in its VE state space (x_VP * sqrt(1 + sigma^2)), as in diffusers.
    """
    return _run(eps_fn, noise, _validated(solver, num_steps), num_steps, keep_trajectory=True)[:3]


def sample(eps_fn: EpsFn, noise: jax.Array, *, solver: str = "dpmpp_2m", num_steps: int = 14) -> jax.Array:
    """Denoise standard-normal noise [B, ...] to x0 with eps_fn(x, t[B] float32); jittable, deterministic."""
    return _run(eps_fn, noise, _validated(solver, num_steps), num_steps)[0]


def sample_with_aux(
    eps_fn: Callable, noise: jax.Array, *, solver: str = "dpmpp_2m", num_steps: int = 14
) -> tuple[jax.Array, jax.Array, object]:
    """Like sample, for eps_fn(x, t) -> (eps, aux): (x0, timesteps [N], aux of every step stacked on a leading [N])."""
    x, timesteps, _, aux = _run(eps_fn, noise, _validated(solver, num_steps), num_steps, has_aux=True)
    return x, timesteps, aux


def _run(eps_fn, noise, solver: _Solver, num_steps: int, *, keep_trajectory: bool = False, has_aux: bool = False):
    plan = solver.plan(num_steps)
    dtype = noise.dtype
    xs = (
        jnp.asarray(plan.timesteps, jnp.float32),
        {name: jnp.asarray(value, dtype) for name, value in plan.coefficients.items()},
    )

    def body(state, step_inputs):
        x, carry = state
        t, c = step_inputs
        eps, aux = _eps(eps_fn, solver.model_input(x, c), t, has_aux)
        carry, x = solver.step(carry, x, eps, c)
        return (x, carry), (x if keep_trajectory else None, aux)

    x = noise * jnp.asarray(plan.init_noise_scale, dtype)
    (x, _), (trajectory, aux) = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x, xs[0], trajectory, aux
