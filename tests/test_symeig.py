"""symeig: the Jacobi eigensolver against numpy's float64 LAPACK, its round-robin order, and the hang it exists to
avoid (the CPU LAPACK eigh on several XLA devices at once)."""

import itertools
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from xla_env import subprocess_env

from relcirc_jax.analysis import diversity, symeig
from tests.conftest import REPO


def _matrices(n: int, rng: np.random.Generator) -> np.ndarray:
    """[4, 6, n, n] float32: symmetric Gaussian, low-rank PSD, cosine kernels of duplicated samples (repeated
    eigenvalues, most of them 0) and of distinct ones, 6 of each."""
    gauss = rng.normal(size=(6, n, n))
    low_rank = rng.normal(size=(6, n, max(1, n // 3)))
    two_samples = rng.normal(size=(6, 2, 5))
    duplicated = np.take_along_axis(two_samples, rng.integers(0, 2, size=(6, n, 1)), 1)
    distinct = rng.normal(size=(6, n, 12))
    units = [f / np.linalg.norm(f, axis=-1, keepdims=True) for f in (duplicated, distinct)]
    kinds = [gauss + gauss.transpose(0, 2, 1), low_rank @ low_rank.transpose(0, 2, 1)]
    kinds += [u @ u.transpose(0, 2, 1) / n for u in units]
    return np.stack(kinds).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16, 31, 32, 40])
def test_eigh_matches_numpy_on_batches_of_every_kind(n):
    # 40 > JACOBI_MAX_N: the LAPACK path, same contract.
    a = _matrices(n, np.random.default_rng(n))
    lam, vec = jax.jit(symeig.eigh)(a)
    lam, vec = np.asarray(lam, np.float64), np.asarray(vec, np.float64)
    scale = np.abs(np.linalg.eigvalsh(a.astype(np.float64))).max(-1)[..., None]
    tolerance = 2e-6 * n + 1e-6  # float32 rounding grows with N
    np.testing.assert_array_less(np.abs(lam - np.linalg.eigvalsh(a.astype(np.float64))) / scale, tolerance)
    assert np.all(np.diff(lam, axis=-1) >= 0)  # ascending, as jnp.linalg.eigh
    rebuilt = vec @ (lam[..., None] * np.swapaxes(vec, -1, -2))
    np.testing.assert_array_less(np.abs(rebuilt - a).max(-1) / scale, tolerance)
    np.testing.assert_allclose(np.swapaxes(vec, -1, -2) @ vec, np.broadcast_to(np.eye(n), vec.shape), atol=tolerance)
    np.testing.assert_allclose(symeig.eigvalsh(a[0, 0]), lam[0, 0], rtol=0, atol=1e-6 * scale[0, 0, 0])


@pytest.mark.parametrize("n", [2, 4, 6, 8, 32])
def test_the_round_robin_pairs_every_two_indices_once_per_sweep_and_returns_to_the_start(n):
    sigma = symeig._round_robin_shift(n)
    order, seen = np.arange(n), []
    for _ in range(n - 1):
        seen += [frozenset(pair) for pair in order.reshape(-1, 2)]
        order = order[sigma]
    assert sorted(map(sorted, seen)) == sorted(map(list, itertools.combinations(range(n), 2)))
    np.testing.assert_array_equal(order, np.arange(n))


def test_log_vendi_on_two_cpu_devices_does_not_hang():
    # A batch of 8 x 8 kernels sharded over 2 XLA CPU devices: the CPU LAPACK eigh splits each device's share into
    # tasks on the shared 2-thread pool and blocks a pool thread per device until they run, so it hung here within
    # a few calls (jaxlib 0.10.2; 2,048 matrices). Jacobi sweeps finish.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec
        from relcirc_jax.analysis import diversity
        from relcirc_jax.parallel import make_mesh

        mesh = make_mesh({"data": 2, "fsdp": 1, "model": 1})
        x = jax.random.normal(jax.random.key(0), (2048, 8, 16))
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        entropy = jax.jit(jax.vmap(jax.value_and_grad(diversity.log_vendi)))
        for i in range(20):
            value, grad = jax.block_until_ready(entropy(x + i))
        print("done", float(value.mean()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(2), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("done")
    assert 0 < float(result.stdout.split()[1]) <= np.log(8) + 1e-5


def test_vendi_and_its_gradient_run_on_a_batch_sharded_over_an_explicit_mesh_axis():
    # Under Explicit sharding a reshape that splits dims of a batch-sharded array is refused, and a loop carry must
    # keep its sharding: the sweeps use neither. Same numbers as unsharded.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    features = np.random.default_rng(0).normal(size=(16, 7, 12)).astype(np.float32)  # odd N: the padded path
    entropy = jax.jit(jax.vmap(jax.value_and_grad(diversity.log_vendi)))
    want_value, want_grad = entropy(features)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(features, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        value, grad = entropy(sharded)
        assert value.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(value), np.asarray(want_value), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-6)
