// XLA FFI handler: C[M, N] (float32) = op(A) op(B) for bfloat16 matrices A and B, through an MKL-style
// cblas_gemm_bf16bf16f32 whose address Python hands over (relcirc_set_bf16_gemm), so this library links nothing.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS_LAYOUT / CBLAS_TRANSPOSE values of the CBLAS standard.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using Bf16GemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
Bf16GemmFn bf16_gemm = nullptr;

ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                    bool transpose_a, bool transpose_b) {
  if (bf16_gemm == nullptr) return ffi::Error::InvalidArgument("relcirc bf16 gemm: no gemm function was set");
  auto a_dims = a.dimensions(), b_dims = b.dimensions(), c_dims = c->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || c_dims.size() != 2)
    return ffi::Error::InvalidArgument("relcirc bf16 gemm: operands and result must be matrices");
  const int64_t m = c_dims[0], n = c_dims[1], k = transpose_a ? a_dims[0] : a_dims[1];
  bf16_gemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, static_cast<int>(m),
            static_cast<int>(n), static_cast<int>(k), 1.0f, reinterpret_cast<const uint16_t*>(a.typed_data()),
            static_cast<int>(a_dims[1]), reinterpret_cast<const uint16_t*>(b.typed_data()),
            static_cast<int>(b_dims[1]), 0.0f, c->typed_data(), static_cast<int>(n));
  return ffi::Error::Success();
}

}  // namespace

extern "C" void relcirc_set_bf16_gemm(void* fn) { bf16_gemm = reinterpret_cast<Bf16GemmFn>(fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(RelcircBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
