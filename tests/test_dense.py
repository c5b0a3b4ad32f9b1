"""models/dense.py: the Dense layer has nn.Dense's parameters and output, and its VJP is autodiff's (up to summation
order) for the input, the kernel and the bias."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from relcirc_jax.models.dense import Dense, dense


def _plain(x, kernel, bias):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


@pytest.mark.parametrize("shape", [(6, 5), (4, 7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_dot_plus_bias_and_gradients_are_autodiffs(shape, dtype):
    kx, kw, kb, kc = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, shape).astype(dtype)
    kernel = jax.random.normal(kw, (shape[-1], 3)).astype(dtype)
    bias = jax.random.normal(kb, (3,)).astype(dtype)
    cotangent = jax.random.normal(kc, shape[:-1] + (3,)).astype(dtype)

    def vjp(fn):
        out, pullback = jax.vjp(fn, x, kernel, bias)
        return out, pullback(cotangent)

    (ours, grads), (theirs, autodiff) = vjp(dense), vjp(_plain)
    # bfloat16: one rounding of the f32 product + bias here, two (product, then sum) in the plain form
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=0 if dtype == jnp.float32 else 2**-7 * 8
    )
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want, primal in zip(grads, autodiff, (x, kernel, bias)):
        assert got.dtype == want.dtype == dtype and got.shape == primal.shape
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_has_nn_dense_parameters_and_output(dtype):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 5))
    bias_init = nn.initializers.normal(1.0)  # not zeros, so the bias is checked too
    ours = Dense(3, dtype, nn.initializers.xavier_uniform(), bias_init)
    flax_dense = nn.Dense(3, dtype=dtype, param_dtype=jnp.float32, bias_init=bias_init)
    params = ours.init(jax.random.PRNGKey(2), x)
    reference = flax_dense.init(jax.random.PRNGKey(2), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), reference)
    got, want = ours.apply(params, x), flax_dense.apply(params, x)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-6 if dtype == jnp.float32 else 2**-7 * 8
    )
