// XLA FFI handlers: C[M, N] (float32) = op(A) op(B) for bfloat16 matrices A and B, one per gemm library:
// oneMKL's cblas_gemm_bf16bf16f32 and oneDNN's dnnl_gemm_bf16bf16f32 (both row-major), whose addresses Python hands
// over (relcirc_set_mkl_gemm, relcirc_set_onednn_gemm), so this library links nothing.
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS_LAYOUT / CBLAS_TRANSPOSE values of the CBLAS standard.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using MklGemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                           float*, int);
using OnednnGemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const uint16_t*, int64_t,
                             const uint16_t*, int64_t, float, float*, int64_t);
using SetThreadsFn = void (*)(int);
MklGemmFn mkl_gemm = nullptr;
OnednnGemmFn onednn_gemm = nullptr;
SetThreadsFn onednn_set_omp_threads = nullptr;

struct Product {
  int64_t m, n, k, lda, ldb;
  const uint16_t* a;
  const uint16_t* b;
  float* c;
};

// False when an operand or the result is not a matrix.
bool Describe(ffi::Buffer<ffi::BF16>& a, ffi::Buffer<ffi::BF16>& b, ffi::ResultBuffer<ffi::F32>& c, bool transpose_a,
              Product* p) {
  auto a_dims = a.dimensions(), b_dims = b.dimensions(), c_dims = c->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || c_dims.size() != 2) return false;
  *p = Product{c_dims[0], c_dims[1], transpose_a ? a_dims[0] : a_dims[1], a_dims[1], b_dims[1],
               reinterpret_cast<const uint16_t*>(a.typed_data()), reinterpret_cast<const uint16_t*>(b.typed_data()),
               c->typed_data()};
  return true;
}

ffi::Error NotMatrices() {
  return ffi::Error::InvalidArgument("relcirc bf16 gemm: operands and result must be matrices");
}

ffi::Error MklBf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                       bool transpose_a, bool transpose_b) {
  if (mkl_gemm == nullptr) return ffi::Error::InvalidArgument("relcirc bf16 gemm: oneMKL's gemm was not set");
  Product p;
  if (!Describe(a, b, c, transpose_a, &p)) return NotMatrices();
  mkl_gemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, static_cast<int>(p.m),
           static_cast<int>(p.n), static_cast<int>(p.k), 1.0f, p.a, static_cast<int>(p.lda), p.b,
           static_cast<int>(p.ldb), 0.0f, p.c, static_cast<int>(p.n));
  return ffi::Error::Success();
}

ffi::Error OnednnBf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                          bool transpose_a, bool transpose_b) {
  if (onednn_gemm == nullptr) return ffi::Error::InvalidArgument("relcirc bf16 gemm: oneDNN's gemm was not set");
  Product p;
  if (!Describe(a, b, c, transpose_a, &p)) return NotMatrices();
  // oneDNN's OpenMP build would start a thread team per call; each XLA CPU device runs its products on its own
  // thread (the ICV is per thread), as oneMKL's sequential layer does.
  onednn_set_omp_threads(1);
  int status = onednn_gemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', p.m, p.n, p.k, 1.0f, p.a, p.lda,
                           p.b, p.ldb, 0.0f, p.c, p.n);
  if (status != 0)
    return ffi::Error::Internal("relcirc bf16 gemm: dnnl_gemm_bf16bf16f32 returned status " + std::to_string(status));
  return ffi::Error::Success();
}

}  // namespace

extern "C" void relcirc_set_mkl_gemm(void* gemm) { mkl_gemm = reinterpret_cast<MklGemmFn>(gemm); }

extern "C" void relcirc_set_onednn_gemm(void* gemm, void* omp_set_num_threads) {
  onednn_gemm = reinterpret_cast<OnednnGemmFn>(gemm);
  onednn_set_omp_threads = reinterpret_cast<SetThreadsFn>(omp_set_num_threads);
}

#define RELCIRC_BF16_GEMM_BINDING    \
  ffi::Ffi::Bind()                   \
      .Arg<ffi::Buffer<ffi::BF16>>() \
      .Arg<ffi::Buffer<ffi::BF16>>() \
      .Ret<ffi::Buffer<ffi::F32>>()  \
      .Attr<bool>("transpose_a")     \
      .Attr<bool>("transpose_b")

XLA_FFI_DEFINE_HANDLER_SYMBOL(RelcircMklBf16Gemm, MklBf16Gemm, RELCIRC_BF16_GEMM_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RelcircOnednnBf16Gemm, OnednnBf16Gemm, RELCIRC_BF16_GEMM_BINDING);
