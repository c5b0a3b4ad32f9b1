// XLA FFI handler: C[batch..., M, N] (float32) = op(A) op(B) for bfloat16 A and B, through an MKL-style
// cblas_gemm_bf16bf16f32 whose address Python hands over (relcirc_set_bf16_gemm), so this library links nothing.
#include <cstdint>
#include <vector>

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
  const size_t rank = c_dims.size();
  if (rank < 2 || a_dims.size() != rank || b_dims.size() != rank)
    return ffi::Error::InvalidArgument("relcirc bf16 gemm: operands and result need the same rank >= 2");
  const int64_t m = c_dims[rank - 2], n = c_dims[rank - 1];
  const int64_t k = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
  // batch dims: each operand's is the result's or 1 (vmap's expand_dims)
  int64_t batch = 1;
  std::vector<int64_t> a_stride(rank, 0), b_stride(rank, 0);
  for (size_t d = 0; d + 2 < rank; ++d) {
    batch *= c_dims[d];
    if ((a_dims[d] != c_dims[d] && a_dims[d] != 1) || (b_dims[d] != c_dims[d] && b_dims[d] != 1))
      return ffi::Error::InvalidArgument("relcirc bf16 gemm: batch dims must match the result's or be 1");
  }
  const int64_t a_matrix = a_dims[rank - 2] * a_dims[rank - 1], b_matrix = b_dims[rank - 2] * b_dims[rank - 1];
  const uint16_t* a_data = reinterpret_cast<const uint16_t*>(a.typed_data());
  const uint16_t* b_data = reinterpret_cast<const uint16_t*>(b.typed_data());
  float* c_data = c->typed_data();
  const int lda = static_cast<int>(a_dims[rank - 1]), ldb = static_cast<int>(b_dims[rank - 1]);
  for (int64_t i = 0; i < batch; ++i) {
    // the flat batch index i as offsets into a and b, where a size-1 dim repeats
    int64_t rest = i, a_index = 0, b_index = 0, a_scale = 1, b_scale = 1;
    for (size_t d = rank - 2; d-- > 0;) {
      const int64_t digit = rest % c_dims[d];
      rest /= c_dims[d];
      if (a_dims[d] != 1) a_index += digit * a_scale;
      if (b_dims[d] != 1) b_index += digit * b_scale;
      a_scale *= a_dims[d];
      b_scale *= b_dims[d];
    }
    bf16_gemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a_data + a_index * a_matrix, lda,
              b_data + b_index * b_matrix, ldb, 0.0f, c_data + i * m * n, static_cast<int>(n));
  }
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
