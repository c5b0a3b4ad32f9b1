"""Eigen-decomposition of small symmetric matrices by cyclic Jacobi rotations, in plain JAX ops (no LAPACK call).

Why not `jnp.linalg.eigh`: on the CPU it is a LAPACK custom call that splits a large enough batch of matrices into
tasks on XLA's intra-op thread pool and then blocks its own thread until they finish. When a program runs on as many
XLA CPU devices as the pool has threads (the `:cpu` configs' 2 devices on 2 cores, or 8 test devices), each device's
call can block a pool thread at the same moment and no thread is left to run the tasks: the process hangs without an
error (jaxlib 0.10.2; seen in the diversity study's repulsion inside the sharded sampler, reproduced with a batch of
2048 8x8 matrices on 2 devices). Vendi needs the spectra of kernels of a handful of samples (N = a group, a subset,
at most a few dozen), where a batched Jacobi sweep costs little and runs the same on every backend.

Method (Golub & Van Loan, Matrix Computations, 8.5): each sweep visits every pair (p, q) once in the round-robin
("chess tournament") order, N - 1 rounds of N / 2 disjoint pairs; a round applies its N / 2 rotations at once
(A <- J^T A J, V <- V J), each zeroing its A_pq, on adjacent pairs of a basis order that a fixed permutation moves
on between rounds (so every round is the same elementwise program). The off-diagonal mass falls
quadratically once small; float32 reaches its rounding floor within `sweeps(N)` sweeps for the sizes used here (the
tests check N = 1..64 against numpy, repeated eigenvalues included). An odd N is padded with a zero row and column
that no rotation touches (its A_pq are 0), dropped at the end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Largest N decomposed by Jacobi sweeps: Vendi's groups and subsets are far smaller; a 64 x 64 batch already takes
# ~40x LAPACK's time on a CPU.
JACOBI_MAX_N = 32


def sweeps(n: int) -> int:
    """Jacobi sweeps for N x N: quadratic convergence after the first few (float32 floor by ~log2(N) + 5)."""
    return max(6, math.ceil(math.log2(max(n, 2))) + 5)


def _round_robin_shift(n: int) -> np.ndarray:
    """sigma [n] for even n: the basis order of the next round is this round's order[sigma]. A round pairs the
    adjacent entries (0, 1), (2, 3), ... of its order; the orders follow the round-robin tournament (player 0 stays,
    the others rotate), so n - 1 rounds pair every two indices once and bring the order back to the start."""
    half = n // 2
    players = np.arange(n)
    pairs_adjacent = lambda ring: np.stack([ring[:half], ring[half:][::-1]], -1).reshape(-1)  # noqa: E731
    now = pairs_adjacent(players)
    later = pairs_adjacent(np.concatenate([players[:1], players[-1:], players[1:-1]]))
    return np.argsort(now)[later]


def _rotate_columns(m: jax.Array, c: jax.Array, s: jax.Array) -> jax.Array:
    """m J for the rotations J of the adjacent column pairs (2k, 2k + 1) by (c_k, s_k) [..., N / 2], with the
    columns returned as (0, 2, 4, ..., 1, 3, 5, ...) (the caller's permutation puts them back). Strided slices, not
    reshapes, which a batch sharded over an Explicit mesh axis refuses."""
    first, second = m[..., 0::2], m[..., 1::2]
    c, s = c[..., None, :], s[..., None, :]
    return jnp.concatenate([c * first - s * second, s * first + c * second], -1)


def _one_round(a: jax.Array, v: jax.Array, shift: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Zero a's adjacent off-diagonal pairs (2k, 2k + 1) by one rotation each (a <- J^T a J, v <- v J), then move
    to the next round's basis order (`shift`: from _rotate_columns' even-then-odd columns)."""
    diagonal = jnp.diagonal(a, axis1=-2, axis2=-1)
    a_pp, a_qq = diagonal[..., 0::2], diagonal[..., 1::2]
    a_pq = jnp.diagonal(a[..., 0::2, 1::2], axis1=-2, axis2=-1)
    nonzero = jnp.abs(a_pq) > jnp.finfo(a.dtype).tiny
    tau = (a_qq - a_pp) / (2.0 * jnp.where(nonzero, a_pq, 1.0))
    t = jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1.0 + tau * tau))  # the smaller angle
    t = jnp.where(nonzero, t, 0.0)
    c = 1.0 / jnp.sqrt(1.0 + t * t)
    s = t * c
    a = _rotate_columns(a, c, s)
    a = jnp.swapaxes(_rotate_columns(jnp.swapaxes(a, -1, -2), c, s), -1, -2)
    v = _rotate_columns(v, c, s)
    return a[..., shift, :][..., :, shift], v[..., :, shift]


def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(eigenvalues [..., N] ascending, eigenvectors [..., N, N] as columns) of the symmetric a [..., N, N], like
    jnp.linalg.eigh: by cyclic Jacobi (module docstring) up to N = JACOBI_MAX_N, by jnp.linalg.eigh above (where
    the sweeps would cost more than they save; a batch of such matrices on several CPU devices can still hang).
    Reads the symmetric part (a + a^T) / 2."""
    a = jnp.asarray(a)
    n = a.shape[-1]
    if a.ndim < 2 or a.shape[-2] != n:
        raise ValueError(f"eigh needs square matrices [..., N, N], got shape {a.shape}")
    a = (a + jnp.swapaxes(a, -1, -2)) / 2
    if n > JACOBI_MAX_N:
        return jnp.linalg.eigh(a)
    if n == 1:
        return a[..., 0], jnp.ones_like(a)
    padded = n + n % 2
    if padded != n:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, 1), (0, 1)])
    # the next round's order of _rotate_columns' even-then-odd columns: undo that split, then shift
    shift = np.argsort(np.concatenate([np.arange(0, padded, 2), np.arange(1, padded, 2)]))[_round_robin_shift(padded)]
    v = jnp.zeros_like(a) + jnp.eye(padded, dtype=a.dtype)  # batched (and sharded) like a
    # whole sweeps, so the order is back to the start (and an odd N's padding index last) at the end
    rounds = sweeps(n) * (padded - 1)
    a, v = jax.lax.fori_loop(0, rounds, lambda _, av: _one_round(*av, shift), (a, v))
    lam = jnp.diagonal(a, axis1=-2, axis2=-1)[..., :n]
    v = v[..., :n, :n]
    order = jnp.argsort(lam, axis=-1)
    return jnp.take_along_axis(lam, order, -1), jnp.take_along_axis(v, order[..., None, :], -1)


def eigvalsh(a: jax.Array) -> jax.Array:
    """The eigenvalues [..., N] of the symmetric a [..., N, N], ascending (see eigh)."""
    return eigh(a)[0]
