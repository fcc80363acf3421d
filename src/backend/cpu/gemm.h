// Matrix products of activations with weights: float32 products in OpenBLAS
// sgemm, bf16 products in our packed GEMM (BLIS-style panels and a register-
// tiled vdpbf16ps micro-kernel from kernels.h). Weights of any dtype are
// converted chunk by chunk (or panel by panel), never as whole matrices.
#pragma once
#include <cstdint>

#include "backend/cpu/kernels.h"
#include "monet/tensor.h"

namespace monet::cpu {

// The arithmetic of the products: F32 is exact float32 (weights widened);
// BF16 rounds activations and weights to bf16 per packed panel and
// accumulates their products in float32 (vdpbf16ps).
enum class GemmCompute { F32, BF16 };

// C[M, N] (+)= A[M, K] . W^T  for a weight W [N, K]      (transposed = true: linear layers)
// C[M, N] (+)= A[M, K] . W    for a weight W [K, N]      (transposed = false: expert outputs)
// A and C are float32 with leading dimensions lda and ldc. `threads` share
// the N dimension (every weight row is read once).
void gemm(const KernelSet& k, int threads, GemmCompute compute, const float* A, int64_t lda, int64_t M, const Weight& W,
          bool transposed, float* C, int64_t ldc, bool accumulate);

}  // namespace monet::cpu
