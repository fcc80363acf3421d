// AMX tile kernels for the sparse expert products (expert_mix.cpp): the
// small per-expert GEMMs of many tokens, with bf16 inputs and float32 sums,
// as the dense path's oneDNN products take them. Compiled with the AMX flags
// whatever MONET_NATIVE says (amx.cpp) and used only where usable() says so;
// amx.cpp instantiates no library templates (a copy built with these flags
// could be the one the linker keeps for every caller).
#pragma once
#include <cstddef>
#include <cstdint>

namespace monet::cpu::amx {

// Rows of an activation tile: the most tokens one call takes.
constexpr int64_t kTileRows = 16;
// The most pair rows of packed v slices (axpy_tile's K, 2 values per pair row).
constexpr int64_t kMaxPairRows = 16;
// axpy_tile's scratch: the products of 48 columns of 16 tokens.
constexpr int64_t kAxpyScratchFloats = kTileRows * 48;

// This binary has the tile kernels, the CPU has AMX-BF16 and the kernel lets
// this process use the tile registers.
bool usable();

// packed[r * w + n] = the bf16 pair (u[n][2r], u[n][2r + 1]) for r < K/2, n < w:
// w rows of u (bf16, `row_bytes` apart, K values each) in the tile layout of
// dot_tile's second operand. w <= 16, K % 32 == 0.
void pack_u(const uint16_t* u, size_t row_bytes, int64_t w, int64_t K, uint32_t* packed);

// c[t * w + n] = sum_k a[t][k] u[n][k] for t < 16, n < w, float32 sums of
// bf16 products: a[t] the bf16 rows of nt <= 16 tokens (rows past nt are
// computed from row 0 and to be ignored), u packed by pack_u.
void dot_tile(const uint16_t* const* a, int64_t nt, const uint32_t* packed, int64_t w, int64_t K, float* c);

// packed[r * N + n] = the bf16 pair (rows[2r][n], rows[2r + 1][n]) for
// r < (n_rows + 1) / 2, n < N (an odd last row pairs with zero).
void pack_pairs(const uint16_t* const* rows, int64_t n_rows, int64_t N, uint32_t* packed);

// out[t][n] += sum_j a[t][j] rows[j][n] for t < nt <= 16, n < N (N % 16 == 0):
// a is 16 bf16 rows `lda` values apart holding 2 * pair_rows coefficients
// (pair_rows <= kMaxPairRows), the rows packed by pack_pairs; out[t] are the
// tokens' float32 output rows; c: scratch of kAxpyScratchFloats floats.
void axpy_tile(const uint16_t* a, int64_t lda, int64_t pair_rows, const uint32_t* packed, int64_t N,
               float* const* out, int64_t nt, float* c);

}  // namespace monet::cpu::amx
