"""models/dense.py: the Dense product's forward is lax.dot_general's, its VJP autodiff's (up to summation order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from relcirc_jax.models.dense import dense_dot_general


def _dims(x):
    return (((x.ndim - 1,), (0,)), ((), ()))


@pytest.mark.parametrize("shape", [(6, 5), (4, 7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_dot_general_and_gradients_are_autodiffs(shape, dtype):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape).astype(dtype)
    w = jax.random.normal(kw, (shape[-1], 3)).astype(dtype)
    cotangent = jax.random.normal(kc, shape[:-1] + (3,)).astype(dtype)

    def vjp(dot):
        out, pullback = jax.vjp(lambda a, b: dot(a, b, _dims(a)), x, w)
        return out, pullback(cotangent)

    (ours, (gx, gw)), (theirs, (rx, rw)) = vjp(dense_dot_general), vjp(lax.dot_general)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    assert gx.dtype == rx.dtype == dtype and gw.dtype == rw.dtype == dtype and gw.shape == w.shape
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want in ((gx, rx), (gw, rw)):
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tolerance * np.abs(want).max())


def test_other_contractions_are_refused():
    x, w = jnp.ones((4, 5)), jnp.ones((3, 5))
    with pytest.raises(ValueError, match="Dense layers only"):
        dense_dot_general(x, w, (((1,), (1,)), ((), ())))
    with pytest.raises(ValueError, match="preferred_element_type"):
        dense_dot_general(x, w.T, _dims(x), preferred_element_type=jnp.float32)
