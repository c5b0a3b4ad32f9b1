"""models/cpu_bf16_matmul.py: oneMKL's and oneDNN's bf16 products equal float32 products of the same bf16 numbers,
in every transpose, under vmap and sharded over 8 devices (rows kept sharded, a sharded contraction summed), and the
Dense layer's gradients through them equal XLA's. Each library that runs here is forced on (RELCIRC_CPU_BF16_MATMUL=mkl
/ onednn): oneMKL on any x86-64 CPU, oneDNN on one with AVX-512; without bf16 units they compute the same numbers more
slowly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.errors import UserError
from relcirc_jax.models import cpu_bf16_matmul
from relcirc_jax.models.dense import dense

HERE = cpu_bf16_matmul.runnable_libraries()  # oneMKL anywhere; oneDNN's bf16 gemm needs AVX-512


@pytest.fixture(params=HERE)
def forced(monkeypatch, request):
    """The path forced on with each gemm library; the library's FFI target name."""
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, request.param)
    assert cpu_bf16_matmul.status() == (True, cpu_bf16_matmul.LIBRARY_GEMMS[request.param])
    return f"{cpu_bf16_matmul.TARGET}_{request.param}"


def _bf16(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape).astype(jnp.bfloat16)


def _exact(a, b, transpose_a=False, transpose_b=False):
    """float64 product of the bf16 values (each bf16 x bf16 product is exact in float32; only the sum rounds)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a.T if transpose_a else a) @ (b.T if transpose_b else b)


def _assert_close_to_exact(got, want, k):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=4e-7 * k * np.abs(want).max())


def _custom_calls(hlo_text: str, target: str = cpu_bf16_matmul.TARGET) -> int:
    """FFI products in the HLO: of the library whose target is named, else of either library."""
    return hlo_text.count(target)


def test_switch_values(monkeypatch):
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, "0")
    assert cpu_bf16_matmul.status() == (False, f"{cpu_bf16_matmul.ENV_SWITCH}=0")
    x = _bf16(0, (4, 8))
    assert _custom_calls(jax.jit(cpu_bf16_matmul.matmul).lower(x, x.T).as_text()) == 0
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, "yes")
    with pytest.raises(UserError, match="RELCIRC_CPU_BF16_MATMUL='yes' is unknown. Fix: set it to 0"):
        cpu_bf16_matmul.status()


@pytest.mark.parametrize(
    "flags,auto,forced",
    [
        ({"amx_bf16", "avx512_bf16", "avx512f"}, "mkl", "mkl"),
        ({"avx512_bf16", "avx512f"}, "onednn", "onednn"),
        ({"avx512f"}, None, "mkl"),
        ({"avx2"}, None, "mkl"),
    ],
)
def test_auto_takes_onednn_on_avx512_bf16_without_amx_else_onemkl(monkeypatch, flags, auto, forced):
    # oneMKL's bf16 gemm on an AMD EPYC with AVX512-BF16 runs at its float32 rate, oneDNN's at 2-3x (module docstring)
    monkeypatch.setattr(cpu_bf16_matmul, "_load", lambda library: (True, cpu_bf16_matmul.LIBRARY_GEMMS[library]))
    monkeypatch.setattr(cpu_bf16_matmul, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv(cpu_bf16_matmul.ENV_SWITCH, raising=False)
    on, why = cpu_bf16_matmul.status()
    assert (on, why if on else None) == (auto is not None, cpu_bf16_matmul.LIBRARY_GEMMS.get(auto))
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, "1")  # forced on any CPU
    assert cpu_bf16_matmul.status() == (True, cpu_bf16_matmul.LIBRARY_GEMMS[forced])


def test_a_missing_library_falls_back_to_the_other_or_says_what_to_install(monkeypatch):
    missing = {"onednn": "oneDNN is not installed (`pip install -e '.[mkl]'`)"}
    loaded = lambda lib: (False, missing[lib]) if lib in missing else (True, cpu_bf16_matmul.LIBRARY_GEMMS[lib])
    monkeypatch.setattr(cpu_bf16_matmul, "_load", loaded)
    monkeypatch.setattr(cpu_bf16_matmul, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.delenv(cpu_bf16_matmul.ENV_SWITCH, raising=False)
    assert cpu_bf16_matmul.status() == (True, cpu_bf16_matmul.LIBRARY_GEMMS["mkl"])
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, "onednn")  # asked for by name: no fallback
    assert cpu_bf16_matmul.status() == (False, missing["onednn"])
    missing["mkl"] = "oneMKL is not installed (`pip install -e '.[mkl]'`)"
    monkeypatch.delenv(cpu_bf16_matmul.ENV_SWITCH)
    assert cpu_bf16_matmul.status() == (False, f"{missing['onednn']}; {missing['mkl']}")


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (96, 192, 576), (1, 33, 1)])
def test_products_equal_float32_sums_of_the_bf16_values(forced, transpose_a, transpose_b, m, k, n):
    a = _bf16(1, (k, m) if transpose_a else (m, k))
    b = _bf16(2, (n, k) if transpose_b else (k, n))
    # a fresh function: jit's trace cache is keyed on the function, not on the library switch
    product = jax.jit(lambda *args: cpu_bf16_matmul.matmul(*args), static_argnums=(2, 3))
    assert _custom_calls(product.lower(a, b, transpose_a, transpose_b).as_text(), forced) == 1
    got = product(a, b, transpose_a, transpose_b)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    _assert_close_to_exact(got, _exact(a, b, transpose_a, transpose_b), k)


def test_float32_operands_keep_xlas_dot(forced):
    a = jnp.ones((4, 8), jnp.float32)
    assert _custom_calls(jax.jit(cpu_bf16_matmul.matmul).lower(a, a.T).as_text()) == 0


def _dense_loss(x, w, cotangent):
    out = dense(x, w, w[0] / 8)  # a bias that depends on w: its gradient flows back too
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))


@pytest.mark.parametrize("library", HERE)
def test_dense_gradients_on_matrix_units_equal_xlas(monkeypatch, library):
    x, w, cotangent = _bf16(3, (4, 24, 64)), _bf16(4, (64, 96)), _bf16(5, (4, 24, 96))
    runs = {}
    for switch in ("0", library):
        monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, switch)
        grad_fn = jax.jit(jax.value_and_grad(_dense_loss, argnums=(0, 1)))
        assert _custom_calls(grad_fn.lower(x, w, cotangent).as_text()) == (3 if switch == library else 0)
        runs[switch] = grad_fn(x, w, cotangent)
    (loss_xla, grads_xla), (loss_ffi, grads_ffi) = runs["0"], runs[library]
    assert float(loss_ffi) == pytest.approx(float(loss_xla), rel=1e-3)
    for got, want in zip(grads_ffi, grads_xla):
        assert got.dtype == want.dtype == jnp.bfloat16
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2 * np.abs(want).max())


def test_vmap_over_the_rows_is_one_product_and_other_batchings_are_exact(forced):
    x, w = _bf16(6, (3, 10, 16)), _bf16(7, (16, 8))
    over_rows = jax.jit(jax.vmap(lambda xi: cpu_bf16_matmul.matmul(xi, w)))
    assert _custom_calls(over_rows.lower(x).as_text(), forced) == 1
    _assert_close_to_exact(over_rows(x), np.einsum("vmk,kn->vmn", *(np.asarray(t, np.float64) for t in (x, w))), 16)
    weights = jnp.stack([w, w * 2])
    over_weights = jax.jit(jax.vmap(lambda wi: cpu_bf16_matmul.matmul(x[0], wi, False, True), in_axes=0))
    want = np.stack([_exact(x[0], wi, False, True) for wi in np.swapaxes(np.asarray(weights, np.float64), 1, 2)])
    _assert_close_to_exact(over_weights(jnp.swapaxes(weights, 1, 2)), want, 16)


@pytest.mark.parametrize(
    "mesh_shape,x_spec,w_spec",
    [((8,), P("data"), P()), ((2, 4), P(("data", "fsdp")), P("fsdp")), ((2, 4), P("data"), P(None, "fsdp"))],
    ids=["data", "fsdp_weights_rows", "fsdp_weights_columns"],
)
def test_sharded_products_equal_one_device_and_keep_the_rows_sharded(forced, mesh_shape, x_spec, w_spec):
    x, w, cotangent = _bf16(8, (16, 24, 64)), _bf16(9, (64, 96)), _bf16(10, (16, 24, 96))
    grad_fn = jax.jit(jax.value_and_grad(_dense_loss, argnums=(0, 1)))
    loss, (grad_x, grad_w) = grad_fn(x, w, cotangent)
    names = ("data", "fsdp")[: len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(mesh_shape))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(x, x_spec), put(w, w_spec), put(cotangent, x_spec))
    sharded_loss, (sharded_grad_x, sharded_grad_w) = grad_fn(*args)
    assert float(sharded_loss) == pytest.approx(float(loss), rel=1e-5)
    for got, want in ((sharded_grad_x, grad_x), (sharded_grad_w, grad_w)):  # equal up to one bf16 rounding
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2**-7 * np.abs(want).max())
    compiled = grad_fn.lower(*args).compile().as_text()
    gathered = [line for line in compiled.splitlines() if " all-gather(" in line]
    # only FSDP's weight gathers: no activation ([16, 24, ...] or its [384, ...] rows) is ever gathered
    assert all("[64,96]" in line or "[96,64]" in line for line in gathered), gathered
    assert _custom_calls(compiled, forced) >= 3
