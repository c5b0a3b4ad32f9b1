"""bfloat16 matrix products on the CPU's bf16 units (AMX-BF16, AVX512-BF16) through oneMKL or oneDNN, for the Dense
layers.

Why: XLA:CPU's bfloat16 dot does not use them (jaxlib 0.10.2: ~100-130 GFLOP/s, no faster than its float32 dot, with
every XLA flag tried), while the gemm libraries do. Which one depends on the CPU (one core, the DiT's shapes):
oneMKL's `cblas_gemm_bf16bf16f32` runs at 480-860 GFLOP/s on a Sapphire Rapids Xeon (AMX), against ~190 for float32
(2026-12-03); on an AMD EPYC with AVX512-BF16 it runs at 75-99 GFLOP/s, its float32 rate (oneMKL takes no bf16 path on
AMD), where oneDNN's `dnnl_gemm_bf16bf16f32` runs at 206-225 (2026-12-04).

How: a C++ XLA FFI handler per library (`cpu_bf16_matmul.cc`, built by `pip install` into
`relcirc_jax.models._cpu_bf16_matmul`) calls its gemm, whose address Python hands over (so the extension links
nothing and loads without either library). Both run one thread per call (oneMKL's sequential layer; oneDNN's OpenMP
team of one): each XLA CPU device (the `:cpu` configs split the host into one per core) runs its own products on its
own thread. `custom_partitioning` keeps a product sharded like its operands (rows over the data axis; a contraction
sharded across devices is summed with one psum), so a multi-device program gathers nothing. The result is float32
(both accumulate in float32); callers cast it.

When: `matmul` takes this path for bfloat16 operands on the CPU when `enabled()`: the extension was built, a gemm
library loads (`pip install -e '.[mkl]'` installs both, or either found on the library path) and the CPU has
AMX-BF16 or AVX512-BF16 (without them both emulate bf16 and XLA's dot is as fast). The library: oneDNN on a CPU with
AVX512-BF16 and no AMX, else oneMKL; the other where that one is missing or cannot run (oneDNN's bf16 gemm needs
AVX-512, oneMKL's runs on any x86-64 CPU). `RELCIRC_CPU_BF16_MATMUL=0` turns the path off, `=1` forces it on any CPU
(the tests: the libraries compute the same numbers there, slowly), `=mkl` or `=onednn` forces that library. Other
backends keep XLA's dot (`lax.platform_dependent`).
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

TARGET = "relcirc_cpu_bf16_matmul"  # the prefix of both libraries' FFI targets
ENV_SWITCH = "RELCIRC_CPU_BF16_MATMUL"
LIBRARIES = ("mkl", "onednn")
LIBRARY_GEMMS = {"mkl": "oneMKL cblas_gemm_bf16bf16f32", "onednn": "oneDNN dnnl_gemm_bf16bf16f32"}
_MKL_SEQUENTIAL, _MKL_LP64 = 1, 0  # mkl_service.h: MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def _cpu_has_bf16_units() -> bool:
    return any(flag in _cpu_flags() for flag in _BF16_CPU_FLAGS)


def _shared_library(stem: str) -> ctypes.CDLL | None:
    """A library pip put in the environment's lib/ (the newest version first), else the system's one; None if none."""
    candidates = sorted(glob.glob(os.path.join(sys.prefix, "lib", f"{stem}.so*")), reverse=True)
    candidates += [f"{stem}.so.3", f"{stem}.so"]
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


_NOT_INSTALLED = "{} is not installed (`pip install -e '.[mkl]'`)"


def _set_mkl_gemm(handler: ctypes.CDLL) -> str | None:
    """Hands oneMKL's gemm to the handler; the reason when it cannot."""
    mkl = _shared_library("libmkl_rt")
    if mkl is None:
        return _NOT_INSTALLED.format("oneMKL")
    # both must precede any other MKL call in the process
    mkl.MKL_Set_Interface_Layer(_MKL_LP64)
    mkl.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
    handler.relcirc_set_mkl_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p))
    return None


def _set_onednn_gemm(handler: ctypes.CDLL) -> str | None:
    """Hands oneDNN's gemm and its OpenMP runtime's thread setter to the handler; the reason when it cannot."""
    onednn = _shared_library("libdnnl")
    if onednn is None:
        return _NOT_INSTALLED.format("oneDNN")
    try:  # the OpenMP runtime oneDNN itself links (dlsym through its handle searches its dependencies)
        set_threads = ctypes.cast(onednn.omp_set_num_threads, ctypes.c_void_p)
    except AttributeError:
        return "the oneDNN found is not an OpenMP build (`pip install -e '.[mkl]'` brings one)"
    gemm = onednn.dnnl_gemm_bf16bf16f32
    one, product = ctypes.c_uint16(0x3F80), ctypes.c_float(0.0)  # bf16 1.0
    matrix = [ctypes.c_void_p, ctypes.c_int64]  # pointer, leading dimension
    gemm.argtypes = (
        [ctypes.c_char] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_float, *matrix, *matrix, ctypes.c_float, *matrix]
    )
    status = gemm(b"N", b"N", 1, 1, 1, 1.0, ctypes.byref(one), 1, ctypes.byref(one), 1, 0.0, ctypes.byref(product), 1)
    if status != 0 or product.value != 1.0:  # oneDNN implements its bf16 gemm for AVX-512 CPUs only
        return f"oneDNN's bf16 gemm does not run on this CPU (status {status}; it needs AVX-512)"
    handler.relcirc_set_onednn_gemm(ctypes.cast(gemm, ctypes.c_void_p), set_threads)
    return None


# Per library: what hands its gemm to the extension, and the extension's FFI handler that calls it.
_HOOKUPS = {"mkl": (_set_mkl_gemm, "RelcircMklBf16Gemm"), "onednn": (_set_onednn_gemm, "RelcircOnednnBf16Gemm")}


def _target(library: str) -> str:
    return f"{TARGET}_{library}"


@functools.cache
def _load(library: str) -> tuple[bool, str]:
    """(loaded, why): registers the library's FFI target once per process when the extension and the library are
    both there."""
    spec = importlib.util.find_spec("relcirc_jax.models._cpu_bf16_matmul")
    if spec is None or spec.origin is None:
        return False, "the C++ extension was not built (reinstall with `pip install -e .` and a C++ compiler)"
    handler = ctypes.CDLL(spec.origin)
    set_gemm, symbol = _HOOKUPS[library]
    problem = set_gemm(handler)
    if problem is not None:
        return False, problem
    jax.ffi.register_ffi_target(_target(library), jax.ffi.pycapsule(getattr(handler, symbol)), platform="cpu")
    return True, LIBRARY_GEMMS[library]


def _preferred_libraries(switch: str) -> tuple[str, ...]:
    if switch in LIBRARIES:
        return (switch,)
    onednn_first = "avx512_bf16" in _cpu_flags() and "amx_bf16" not in _cpu_flags()
    return ("onednn", "mkl") if onednn_first else ("mkl", "onednn")


def _active() -> tuple[str | None, str]:
    """(library or None, why) for the bfloat16 products of the CPU backend."""
    switch = os.environ.get(ENV_SWITCH, "auto")
    if switch == "0":
        return None, f"{ENV_SWITCH}=0"
    if switch not in ("auto", "1", *LIBRARIES):
        raise UserError(
            f"{ENV_SWITCH}={switch!r} is unknown. Fix: set it to 0 (XLA's dot), 1 (a gemm library on any CPU), "
            "mkl or onednn (that library on any CPU), or unset it (auto: a gemm library where the CPU has AMX-BF16 or "
            "AVX512-BF16)."
        )
    if switch == "auto" and not _cpu_has_bf16_units():
        return None, "this CPU has no AMX-BF16 or AVX512-BF16 (XLA's dot is as fast)"
    reasons = []
    for library in _preferred_libraries(switch):
        loaded, why = _load(library)
        if loaded:
            return library, why
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def runnable_libraries() -> tuple[str, ...]:
    """The gemm libraries that load and run on this CPU, whatever the switch says (e.g. to test each)."""
    return tuple(library for library in LIBRARIES if _load(library)[0])


def status() -> tuple[bool, str]:
    """(on, why) for the bfloat16 products of the CPU backend, e.g. for a run's log; why names the gemm when on."""
    library, why = _active()
    return library is not None, why


def enabled() -> bool:
    return status()[0]


def _xla_matmul(a, b, transpose_a: bool, transpose_b: bool):
    contract_a, contract_b = (0 if transpose_a else 1), (1 if transpose_b else 0)
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _ffi_matmul(a, b, transpose_a: bool, transpose_b: bool, library: str):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    call = jax.ffi.ffi_call(_target(library), jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _dims(transpose_a: bool, transpose_b: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    return (("k", "m") if transpose_a else ("m", "k")), (("n", "k") if transpose_b else ("k", "n"))


def _axes(spec, dim: int) -> tuple[str, ...]:
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _partition(transpose_a, transpose_b, library, mesh, arg_shapes, result_shape):
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
        out = _ffi_matmul(a, b, transpose_a, transpose_b, library)
        return lax.psum(out, k_axes) if k_axes else out

    return mesh, per_device, out_sharding, (a_sharding, b_sharding)


def _infer_sharding(transpose_a, transpose_b, library, mesh, arg_shapes, result_shape):
    return _partition(transpose_a, transpose_b, library, mesh, arg_shapes, result_shape)[2]


# The library is a static argument like the transposes: JAX caches traces by function, so a product traced for one
# library must not be reused for the other.
@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _partitioned_matmul(a, b, transpose_a, transpose_b, library):
    return _ffi_matmul(a, b, transpose_a, transpose_b, library)


def _sharding_rule(transpose_a, transpose_b, library, mesh, arg_shapes, result_shape) -> str:
    del library, mesh, arg_shapes, result_shape
    a_dims, b_dims = _dims(transpose_a, transpose_b)
    return f"{' '.join(a_dims)}, {' '.join(b_dims)} -> m n"


_partitioned_matmul.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_sharding,
    sharding_rule=_sharding_rule,
)


@functools.cache
def _cpu_matmul(transpose_a: bool, transpose_b: bool, library: str):
    """The FFI product for one transpose pair, with a vmap rule: a batched `a` times a shared `b` folds the batch
    into a's rows (one big product, as the ablation screen's vmap over head masks needs); other batchings take
    XLA's batched dot."""

    @jax.custom_batching.custom_vmap
    def product(a, b):
        return _partitioned_matmul(a, b, transpose_a, transpose_b, library)

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
    the gemm library's bf16 product when `enabled()`; everything else is XLA's dot_general accumulating in float32."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"cpu_bf16_matmul.matmul takes 2-D operands, got {a.shape} and {b.shape}")
    xla = functools.partial(_xla_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    library = _active()[0] if a.dtype == b.dtype == jnp.bfloat16 else None
    if library is None:
        return xla(a, b)
    return lax.platform_dependent(a, b, cpu=_cpu_matmul(transpose_a, transpose_b, library), default=xla)
