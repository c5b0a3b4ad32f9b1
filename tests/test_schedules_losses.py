"""Schedule tables vs diffusers' DDPMScheduler, q_sample statistics, the eps/VLB loss on toy cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler

from relcirc_jax.diffusion import diffusion_loss, draw_noising, linear_schedule, mse_loss, q_sample, sample_timesteps
from relcirc_jax.diffusion.losses import vlb_term
from relcirc_jax.diffusion.schedules import alphas_cumprod, linear_betas


@pytest.fixture(scope="module")
def schedule():
    return linear_schedule()


@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def oracle_eps_fn(x0, schedule):
    """The perfect noise predictor for known x0: inverts q_sample at the integer timesteps it is given."""

    def eps_fn(x_t, t):
        abar = schedule.alphas_cumprod[t.astype(jnp.int32)].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)

    return eps_fn


def test_schedule_matches_pixart_ddpm(schedule, ddpm):
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(alphas_cumprod(), ddpm.alphas_cumprod.double().numpy(), rtol=1e-6)
    assert schedule.alphas_cumprod.dtype == jnp.float32 and schedule.num_timesteps == 1000
    t = torch.arange(1, 1000)
    expected_var = torch.stack([ddpm._get_variance(int(i)) for i in t]).numpy()
    # diffusers works in float32, where 1 - abar at small t keeps only ~4 digits.
    np.testing.assert_allclose(schedule.posterior_variance[1:], expected_var, rtol=1e-3)
    assert schedule.posterior_log_variance_clipped[0] == schedule.posterior_log_variance_clipped[1]


def test_q_sample_matches_diffusers_and_has_the_right_statistics(schedule, ddpm):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 10, 500, 999])
    expected = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ours = q_sample(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), schedule)
    np.testing.assert_allclose(ours, expected, atol=5e-6)

    n = 20000
    big_noise = jax.random.normal(jax.random.key(0), (n, 1))
    for step in (50, 700):
        x_t = q_sample(jnp.full((n, 1), 0.5), big_noise, jnp.full((n,), step), schedule)
        abar = float(alphas_cumprod()[step])
        assert float(x_t.mean()) == pytest.approx(0.5 * abar**0.5, abs=0.03)
        assert float(x_t.std()) == pytest.approx((1 - abar) ** 0.5, rel=0.03)


def test_sample_timesteps_are_uniform_integers():
    t = sample_timesteps(jax.random.key(1), 50000)
    assert t.dtype == jnp.int32 and t.shape == (50000,)
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert float(t.mean()) == pytest.approx(499.5, rel=0.02)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_timesteps_follow_the_logit_normal_quantiles(mean, std):
    t = np.asarray(sample_timesteps(jax.random.key(2), 100_000, logit_normal=(mean, std)))
    assert t.dtype == np.int32 and 0 <= t.min() and t.max() <= 999
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        boundary = 1000 / (1 + np.exp(-(mean + std * scipy.stats.norm.ppf(q))))  # independent closed form
        assert np.mean(t < boundary) == pytest.approx(q, abs=0.01)


def test_high_noise_share_mixes_in_its_logit_normal_component():
    # The mixture's CDF is (1 - share) * base CDF + share * high CDF, both logit-normal in closed form.
    share, high_mean, std = 0.3, 1.5, 1.0
    t = np.asarray(sample_timesteps(jax.random.key(4), 100_000, 1000, (0.0, std), (share, high_mean, std)))
    assert t.dtype == np.int32 and 0 <= t.min() and t.max() <= 999
    for boundary in (200, 500, 800, 950):
        logit = np.log(boundary / (1000 - boundary))
        want = (1 - share) * scipy.stats.norm.cdf(logit / std) + share * scipy.stats.norm.cdf((logit - high_mean) / std)
        assert np.mean(t < boundary) == pytest.approx(want, abs=0.01)


def test_mse_loss_is_the_mean_over_all_dims():
    pred = jnp.zeros((2, 3, 3, 2))
    noise = jnp.arange(36, dtype=jnp.float32).reshape(pred.shape) / 36.0
    loss = mse_loss(pred.astype(jnp.bfloat16), noise)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(float(np.mean(np.square(np.asarray(noise)))), rel=1e-6)


def test_diffusion_loss_is_zero_for_the_oracle_and_one_for_zero_prediction(schedule):
    x0 = jax.random.uniform(jax.random.key(2), (16, 8, 8, 3), minval=-1.0, maxval=1.0)
    noising = draw_noising(jax.random.key(3), x0.shape)
    loss, aux = jax.jit(lambda fn_x0: diffusion_loss(oracle_eps_fn(fn_x0, schedule), fn_x0, noising))(x0)
    assert loss.shape == () and float(loss) < 1e-5 and set(aux) == {"mse"}
    zero_loss, _ = jax.jit(lambda: diffusion_loss(lambda x, t: jnp.zeros_like(x), x0, noising))()
    assert float(zero_loss) == pytest.approx(1.0, abs=0.05)


def test_diffusion_loss_is_deterministic_per_key_and_vmappable():
    x0 = jnp.ones((4, 4, 4, 3)) * 0.3
    fn = lambda x, t: 0.5 * x  # noqa: E731
    loss_fn = jax.jit(lambda key: diffusion_loss(fn, x0, draw_noising(key, x0.shape))[0])
    assert float(loss_fn(jax.random.key(5))) == float(loss_fn(jax.random.key(5)))
    keys = jax.random.split(jax.random.key(6), 3)
    per_key = jax.jit(jax.vmap(loss_fn))(keys)
    assert per_key.shape == (3,) and bool(jnp.all(jnp.isfinite(per_key)))


def test_vlb_is_zero_when_the_model_matches_the_posterior(schedule):
    x0 = jax.random.uniform(jax.random.key(7), (3, 4, 4, 3), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.key(8), x0.shape)
    t = jnp.array([1, 300, 999])
    x_t = q_sample(x0, noise, t, schedule)
    v_at_posterior = -jnp.ones_like(x0)  # frac 0: log variance = the clipped posterior log variance
    vlb = jax.jit(vlb_term)
    vb = vlb(noise, v_at_posterior, x0, x_t, t, schedule)
    np.testing.assert_allclose(vb, 0.0, atol=2e-4)
    at_beta = vlb(noise, jnp.ones_like(x0), x0, x_t, t, schedule)  # frac 1: log variance = log beta_t
    assert bool(jnp.all(at_beta[:2] > 1e-6))  # at t=999 beta_t and the posterior variance nearly coincide
    t0 = jnp.zeros(3, jnp.int32)
    decoder_nll = vlb(noise, v_at_posterior, x0, q_sample(x0, noise, t0, schedule), t0, schedule)
    assert bool(jnp.all(jnp.isfinite(decoder_nll))) and bool(jnp.all(decoder_nll > 0))


def test_learn_sigma_vlb_trains_only_the_variance_channels():
    x0 = jax.random.uniform(jax.random.key(9), (4, 4, 4, 3), minval=-1.0, maxval=1.0)

    def loss_parts(params):
        eps_fn = lambda x, t: jnp.concatenate([params["mean"] * x, params["var"] * jnp.ones_like(x)], -1)  # noqa: E731
        return diffusion_loss(eps_fn, x0, draw_noising(jax.random.key(10), x0.shape), learn_sigma=True)

    params = {"mean": jnp.float32(0.8), "var": jnp.float32(0.1)}
    loss, aux = jax.jit(loss_parts)(params)
    assert set(aux) == {"mse", "vb"} and float(loss) == pytest.approx(float(aux["mse"] + aux["vb"]), rel=1e-6)
    vb_grad, mse_grad = jax.jit(
        lambda p: (jax.grad(lambda q: loss_parts(q)[1]["vb"])(p), jax.grad(lambda q: loss_parts(q)[1]["mse"])(p))
    )(params)
    assert float(vb_grad["mean"]) == 0.0 and float(vb_grad["var"]) != 0.0
    assert float(mse_grad["var"]) == 0.0 and float(mse_grad["mean"]) != 0.0


def test_wrong_output_channels_raise_one_clear_error():
    x0 = jnp.zeros((2, 4, 4, 3))
    noising = draw_noising(jax.random.key(0), x0.shape)
    with pytest.raises(ValueError, match="returned 3 channels but learn_sigma=True"):
        diffusion_loss(lambda x, t: x, x0, noising, learn_sigma=True)
    with pytest.raises(ValueError, match="returned 6 channels but learn_sigma=False"):
        diffusion_loss(lambda x, t: jnp.concatenate([x, x], -1), x0, noising)


def test_a_teacher_target_is_the_weighted_sum_of_both_losses_up_to_a_constant_and_passes_no_gradient():
    # |p - (w a + (1-w) b)|^2 = w |p - a|^2 + (1-w) |p - b|^2 - w (1-w) |a - b|^2, a the teacher's, b the data's.
    x0 = jax.random.uniform(jax.random.key(11), (6, 4, 4, 3), minval=-1.0, maxval=1.0)
    noising, w = draw_noising(jax.random.key(12), x0.shape), 0.3
    student = lambda x, t: 0.5 * x  # noqa: E731

    def teacher(x, t, scale=1.0):
        return scale * jnp.tanh(x) * (t[:, None, None, None] / 1000.0)

    def loss(fn, **kwargs):
        return float(diffusion_loss(fn, x0, noising, prediction="x0", **kwargs)[0])

    mixed = loss(student, teacher_fn=teacher, teacher_weight=w)
    separate = w * loss(student, teacher_fn=teacher) + (1 - w) * loss(student) - w * (1 - w) * loss(teacher)
    assert mixed == pytest.approx(separate, rel=1e-5) and loss(teacher, teacher_fn=teacher) == 0.0
    grad = jax.grad(lambda s: diffusion_loss(student, x0, noising, teacher_fn=lambda x, t: teacher(x, t, s))[0])(1.0)
    assert float(grad) == 0.0
