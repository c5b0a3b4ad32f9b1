"""The diversity baselines in the sampler (analysis/baselines.py): a traced CFG scale, interval guidance, latent
particle guidance and CADS, each against what it must reduce to and what it must do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import noisy

from relcirc_jax.analysis import baselines
from relcirc_jax.diffusion.parameterization import alphas_cumprod_at
from relcirc_jax.models import arch, dit
from relcirc_jax.text import conditioner
from relcirc_jax.train import sampling

CAPTIONS = ["red square is above blue circle"] * 4 + ["blue triangle is to the left of red circle"] * 4


@pytest.fixture(scope="module")
def tiny():
    text = conditioner.make_text_conditioner("rte", dim=16, position_scale=0.5)
    cfg = dit.DiTConfig(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, caption_channels=16)
    params = noisy(arch.init_params(cfg, jax.random.key(0)))
    batch = {k: jnp.asarray(v) for k, v in sampling.caption_batch(CAPTIONS).items()}
    settings = dict(num_steps=4, solver="dpmpp_2m", seed=0, negative="empty_prompt")
    generate = lambda scale: jax.jit(sampling.generate_fn(cfg, text, cfg_scale=scale, **settings))  # noqa: E731
    return lambda scale=3.0, **knobs: np.asarray(
        generate(scale)(params, batch, text.tables, jnp.arange(8), {k: jnp.asarray(v) for k, v in knobs.items()})
    )


def test_a_traced_cfg_scale_and_interval_guidance_reduce_to_plain_cfg(tiny):
    np.testing.assert_array_equal(tiny(3.0, cfg_scale=np.float32(3.0)), tiny(3.0))
    np.testing.assert_array_equal(tiny(3.0, guidance_window=np.array([0.0, 1000.0], np.float32)), tiny(3.0))
    np.testing.assert_array_equal(tiny(3.0, guidance_window=np.array([2000.0, 3000.0], np.float32)), tiny(1.0))
    assert np.abs(tiny(3.0).astype(int) - tiny(1.0).astype(int)).max() > 0


def test_guidance_scale_is_one_outside_the_window():
    t = jnp.array([100.0, 500.0, 900.0])
    np.testing.assert_array_equal(baselines.guidance_scale(4.5, t, jnp.array([200.0, 800.0])), [1.0, 4.5, 1.0])
    np.testing.assert_array_equal(baselines.guidance_scale(4.5, t), [4.5, 4.5, 4.5])


def test_particle_guidance_pushes_each_group_apart_and_only_within_it(tiny):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 4, 4, 3)), jnp.float32)
    eps = jnp.zeros_like(x)
    t = jnp.full((8,), 900.0)
    out = baselines.particle_guidance(eps, x, t, 1.0, 4)
    # x0 = (x - sigma eps) / alpha moves along -eps: every pair of a group moves apart
    for a, b in ((0, 1), (2, 3), (4, 7)):
        assert float(jnp.vdot(-(out[a] - out[b]), x[a] - x[b])) > 0
    moved = baselines.particle_guidance(eps, x.at[4:].add(3.0), t, 1.0, 4)
    np.testing.assert_allclose(moved[:4], out[:4], rtol=1e-6)  # another group's samples do not push this one
    abar = float(alphas_cumprod_at(jnp.array(50.0)))
    assert np.sqrt((1 - abar) / abar) < baselines.PG_SIGMA_BREAK  # low noise: PG is off
    np.testing.assert_array_equal(baselines.particle_guidance(eps, x, jnp.full((8,), 50.0), 1.0, 4), eps)
    np.testing.assert_array_equal(tiny(pg_coeff=np.float32(0.0)), tiny())
    assert np.abs(tiny(pg_coeff=np.float32(5.0)).astype(int) - tiny().astype(int)).max() > 0
    with pytest.raises(ValueError, match="groups of 3"):
        baselines.particle_guidance(eps, x, t, 1.0, 3)


def test_cads_anneals_the_caption_most_at_high_noise(tiny):
    t = jnp.array([100.0, 550.0, 950.0])
    np.testing.assert_allclose(baselines.cads_gamma(t, 0.3, 0.8), [1.0, 0.5, 0.0], atol=1e-6)
    text = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    keys = baselines.cads_keys(0, jnp.arange(3))
    knobs = jnp.array([0.5, 0.3, 0.8, 1.0])
    out = baselines.cads_condition(text, t, keys, knobs)
    np.testing.assert_allclose(out[0], text[0], rtol=1e-5, atol=1e-5)  # gamma = 1: the caption itself
    assert float(jnp.abs(out[2] - text[2]).max()) > 0.1
    np.testing.assert_allclose(jnp.std(out, axis=(1, 2)), jnp.std(text, axis=(1, 2)), rtol=1e-4)  # psi = 1 rescale
    same_t = baselines.cads_condition(jnp.broadcast_to(text[:1], (3, 5, 8)), jnp.full((3,), 950.0), keys, knobs)
    assert float(jnp.abs(same_t[0] - same_t[1]).max()) > 0.1  # fresh noise per sample
    np.testing.assert_array_equal(baselines.cads_condition(text, t, keys, knobs.at[0].set(0.0)), text)
    np.testing.assert_array_equal(tiny(cads=np.array([0.0, 0.3, 0.8, 1.0], np.float32)), tiny())
    assert np.abs(tiny(cads=np.array([0.5, 0.3, 0.8, 1.0], np.float32)).astype(int) - tiny().astype(int)).max() > 0
