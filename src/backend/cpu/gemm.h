// Matrix products of activations with weights: float32 products in OpenBLAS
// sgemm (weights of other dtypes widened chunk by chunk, never as whole
// matrices), bf16 products in oneDNN's matmul (AMX tiles or AVX-512-BF16).
#pragma once
#include <cstdint>

#include "backend/cpu/kernels.h"
#include "monet/tensor.h"

namespace monet::cpu {

// The arithmetic of the products: F32 is exact float32 (weights widened);
// BF16 rounds the activations to bf16 and multiplies them with bf16 weights,
// summing in float32 (emulated exactly where the CPU cannot). F32Split is
// float32 for bf16 weights on AMX: each activation split into three bf16
// parts whose sum is the activation exactly (hi + mid + lo: 3 x 8 bits of
// its 24-bit significand), every part's products with the weights exact in
// float32 and summed in float32 by the tiles, then the three results added
// (lo + mid first). The same products as F32, other float32 roundings in the
// sums; anything else falls back to F32.
enum class GemmCompute { F32, BF16, F32Split };

// The CPU multiplies bf16 natively (AVX-512-BF16 or AMX) / with AMX tiles.
bool bf16_products_native();
bool bf16_tiles();

// C[M, N] (+)= A[M, K] . W^T  for a weight W [N, K]      (transposed = true: linear layers)
// C[M, N] (+)= A[M, K] . W    for a weight W [K, N]      (transposed = false: expert outputs)
// A and C are float32 with leading dimensions lda and ldc. `threads` share
// the N dimension (every weight row is read once).
void gemm(const KernelSet& k, int threads, GemmCompute compute, const float* A, int64_t lda, int64_t M, const Weight& W,
          bool transposed, float* C, int64_t ldc, bool accumulate);

}  // namespace monet::cpu
