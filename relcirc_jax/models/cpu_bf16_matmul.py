"""bfloat16 matrix products on the CPU's matrix units (AMX-BF16, AVX512-BF16) through oneMKL, for the Dense layers.

Why: XLA:CPU's bfloat16 dot does not use the matrix units (jaxlib 0.10.2: ~100-130 GFLOP/s, no faster than its float32
dot, with every XLA flag tried), while oneMKL's `cblas_gemm_bf16bf16f32` does: 480-860 GFLOP/s on one core of a
Sapphire Rapids Xeon for the DiT's shapes, against ~190 for float32 (measured on the 2-core machine, 2026-12-03).

How: a C++ XLA FFI handler (`cpu_bf16_matmul.cc`, built by `pip install` into `relcirc_jax.models._cpu_bf16_matmul`)
calls oneMKL's gemm, whose address Python hands over (so the library links nothing and loads without MKL). MKL runs
its sequential layer: each XLA CPU device (the `:cpu` configs split the host into one per core) runs its own
products on its own thread. `custom_partitioning` keeps a product sharded like its operands (rows over the data
axis; a contraction sharded across devices is summed with one psum), so a multi-device program gathers nothing.
The result is float32 (MKL accumulates in float32); callers cast it.

When: `matmul` takes this path for bfloat16 operands on the CPU when `enabled()`: the extension was built, oneMKL
loads (`pip install -e '.[mkl]'`, or MKL found on the library path) and the CPU has AMX-BF16 or AVX512-BF16 (without
them MKL emulates bf16 and XLA's dot is as fast). `RELCIRC_CPU_BF16_MATMUL=0` turns it off, `=1` forces it on any
CPU (the tests: MKL computes the same numbers there, slowly). Other backends keep XLA's dot (`lax.platform_dependent`).
"""

import ctypes
import functools
import glob
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from relcirc_jax.errors import UserError

TARGET = "relcirc_cpu_bf16_matmul"
ENV_SWITCH = "RELCIRC_CPU_BF16_MATMUL"
_MKL_SEQUENTIAL, _MKL_LP64 = 1, 0  # mkl_service.h: MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def _mkl_runtime() -> ctypes.CDLL | None:
    """oneMKL's single dynamic library, in its sequential threading layer; None when it is not installed."""
    # pip's mkl puts it in the environment's lib/; else the system's library path
    candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")), reverse=True)
    candidates += ["libmkl_rt.so.3", "libmkl_rt.so"]
    for path in candidates:
        try:
            mkl = ctypes.CDLL(path)
        except OSError:
            continue
        # both must precede any other MKL call in the process
        mkl.MKL_Set_Interface_Layer(_MKL_LP64)
        mkl.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
        return mkl
    return None


@functools.cache
def _load() -> tuple[bool, str]:
    """(loaded, why): registers the FFI target once per process when the extension and oneMKL are both there."""
    spec = importlib.util.find_spec("relcirc_jax.models._cpu_bf16_matmul")
    if spec is None or spec.origin is None:
        return False, "the C++ extension was not built (reinstall with `pip install -e .` and a C++ compiler)"
    mkl = _mkl_runtime()
    if mkl is None:
        return False, "oneMKL is not installed (`pip install -e '.[mkl]'`)"
    handler = ctypes.CDLL(spec.origin)
    handler.relcirc_set_bf16_gemm(ctypes.c_void_p(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.RelcircBf16Gemm), platform="cpu")
    return True, "oneMKL cblas_gemm_bf16bf16f32"


def status() -> tuple[bool, str]:
    """(on, why) for the bfloat16 products of the CPU backend, e.g. for a run's log."""
    switch = os.environ.get(ENV_SWITCH, "auto")
    if switch == "0":
        return False, f"{ENV_SWITCH}=0"
    if switch not in ("auto", "1"):
        raise UserError(
            f"{ENV_SWITCH}={switch!r} is unknown. Fix: set it to 0 (XLA's dot), 1 (oneMKL on any CPU) or unset it "
            "(auto: oneMKL where the CPU has AMX-BF16 or AVX512-BF16)."
        )
    if switch == "auto" and not _cpu_has_bf16_units():
        return False, "this CPU has no AMX-BF16 or AVX512-BF16 (XLA's dot is as fast)"
    return _load()


def enabled() -> bool:
    return status()[0]


def _xla_matmul(a, b, transpose_a: bool, transpose_b: bool):
    contract_a, contract_b = (0 if transpose_a else 1), (1 if transpose_b else 0)
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _ffi_matmul(a, b, transpose_a: bool, transpose_b: bool):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _dims(transpose_a: bool, transpose_b: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    return (("k", "m") if transpose_a else ("m", "k")), (("n", "k") if transpose_b else ("k", "n"))


def _axes(spec, dim: int) -> tuple[str, ...]:
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _partition(transpose_a, transpose_b, mesh, arg_shapes, result_shape):
    """Per-device products: m keeps a's sharding, n b's (unless it reuses m's mesh axes), k a's when b's agrees
    (then the partial products are summed over those axes), else k is gathered."""
    del result_shape
    a_dims, b_dims = _dims(transpose_a, transpose_b)
    a_spec, b_spec = arg_shapes[0].sharding.spec, arg_shapes[1].sharding.spec
    m_axes = _axes(a_spec, a_dims.index("m"))
    k_axes = _axes(a_spec, a_dims.index("k"))
    if k_axes != _axes(b_spec, b_dims.index("k")) or set(k_axes) & set(m_axes):
        k_axes = ()
    n_axes = _axes(b_spec, b_dims.index("n"))
    if set(n_axes) & (set(m_axes) | set(k_axes)):
        n_axes = ()
    factor = {"m": m_axes or None, "k": k_axes or None, "n": n_axes or None}
    a_sharding = NamedSharding(mesh, P(*(factor[d] for d in a_dims)))
    b_sharding = NamedSharding(mesh, P(*(factor[d] for d in b_dims)))
    out_sharding = NamedSharding(mesh, P(factor["m"], factor["n"]))

    def per_device(a, b):
        out = _ffi_matmul(a, b, transpose_a, transpose_b)
        return lax.psum(out, k_axes) if k_axes else out

    return mesh, per_device, out_sharding, (a_sharding, b_sharding)


def _infer_sharding(transpose_a, transpose_b, mesh, arg_shapes, result_shape):
    return _partition(transpose_a, transpose_b, mesh, arg_shapes, result_shape)[2]


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _partitioned_matmul(a, b, transpose_a, transpose_b):
    return _ffi_matmul(a, b, transpose_a, transpose_b)


def _sharding_rule(transpose_a, transpose_b, mesh, arg_shapes, result_shape) -> str:
    del mesh, arg_shapes, result_shape
    a_dims, b_dims = _dims(transpose_a, transpose_b)
    return f"{' '.join(a_dims)}, {' '.join(b_dims)} -> m n"


_partitioned_matmul.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_sharding,
    sharding_rule=_sharding_rule,
)


@functools.cache
def _cpu_matmul(transpose_a: bool, transpose_b: bool):
    """The FFI product for one transpose pair, with a vmap rule: a batched `a` times a shared `b` folds the batch
    into a's rows (one big product, as the ablation screen's vmap over head masks needs); other batchings take
    XLA's batched dot."""

    @jax.custom_batching.custom_vmap
    def product(a, b):
        return _partitioned_matmul(a, b, transpose_a, transpose_b)

    @product.def_vmap
    def _product_vmap(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if a_batched and not b_batched and not transpose_a:
            rows = product(a.reshape(axis_size * a.shape[1], a.shape[2]), b)
            return rows.reshape(axis_size, a.shape[1], rows.shape[-1]), True
        in_axes = (0 if a_batched else None, 0 if b_batched else None)
        return jax.vmap(functools.partial(_xla_matmul, transpose_a=transpose_a, transpose_b=transpose_b), in_axes)(
            a, b
        ), True

    return product


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) op(b) of 2-D a and b, float32 result (op = transpose where asked). bfloat16 operands on the CPU take
    oneMKL's matrix-unit gemm when `enabled()`; everything else is XLA's dot_general accumulating in float32."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"cpu_bf16_matmul.matmul takes 2-D operands, got {a.shape} and {b.shape}")
    xla = functools.partial(_xla_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16 or not enabled():
        return xla(a, b)
    return lax.platform_dependent(a, b, cpu=_cpu_matmul(transpose_a, transpose_b), default=xla)
