// AMX tile kernels: for the sparse expert products (expert_mix.cpp), the
// small per-expert GEMMs of many tokens, with bf16 inputs and float32 sums,
// as the dense path's oneDNN products take them; for Q8_0 weights
// (CpuBackend::linear), the int8 products of many tokens. Compiled with the AMX flags
// whatever MONET_NATIVE says (amx.cpp) and used only where usable() says so;
// amx.cpp instantiates no library templates (a copy built with these flags
// could be the one the linker keeps for every caller).
#pragma once
#include <cstddef>
#include <cstdint>

namespace monet::cpu {
struct BlockQ8Act;
struct RowPrefetch;
}

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
// prefetch (null: none; kernels.h) issues a share of its lines per 48
// columns and the rest at the end.
void axpy_tile(const uint16_t* a, int64_t lda, int64_t pair_rows, const uint32_t* packed, int64_t N,
               float* const* out, int64_t nt, float* c, RowPrefetch* prefetch = nullptr);

// Q8_0 rows times many tokens' int8 blocks on the int8 tiles: each 32-value
// block's products summed exactly in int32 by the tiles, then scaled by the
// weight block's and the token block's scales and summed over the blocks in
// float32, in order: y = fma(float(block sum), dw * dx, y). (The row kernels
// sum 4-value pieces per lane instead: the same products, other roundings.)
//
// The bytes pack_q8_tokens writes for T tokens of nb blocks each.
int64_t q8_tokens_bytes(int64_t T, int64_t nb);
// x: T tokens' nb blocks each, token-major. Packed in tiles of 16 tokens
// (tokens past T are zeros); made once and read by every q8_dot_rows_tile.
void pack_q8_tokens(const BlockQ8Act* x, int64_t T, int64_t nb, uint8_t* packed);
// The floats of q8_dot_rows_tile's (and q8_dot_slice_tile's) scratch for nb blocks.
int64_t q8_tile_scratch_floats(int64_t nb);
// y[t * ystride + r] = sum_b dw[r,b] dx[t,b] (qw[r,b] . qx[t,b]) for r < nrows <= 16
// Q8_0 rows `row_bytes` apart (nb blocks each), t < T tokens packed by
// pack_q8_tokens. next: null or the 16 rows the caller reads next (also
// row_bytes apart), prefetched while these are multiplied.
void q8_dot_rows_tile(const void* rows, size_t row_bytes, int64_t nrows, const uint8_t* packed, int64_t T, int64_t nb,
                      float* y, int64_t ystride, const void* next, float* scratch);

// The same products for one expert slice (w <= 16 Q8_0 rows) and the tokens
// that selected it (expert_mix.cpp): the slice packed once, its tokens'
// blocks gathered 16 at a time.
int64_t q8_slice_bytes(int64_t nb);
void pack_q8_slice(const void* rows, size_t row_bytes, int64_t w, int64_t nb, uint8_t* packed);
// out[k * w + n] = sum_b dw[n,b] dx[k,b] (qw[n,b] . qx[k,b]) for n < w and the
// nt <= 16 tokens x[k] (nb blocks each), in q8_dot_rows_tile's order; scratch:
// q8_tile_scratch_floats(nb) floats.
void q8_dot_slice_tile(const BlockQ8Act* const* x, int64_t nt, const uint8_t* packed, int64_t w, int64_t nb,
                       float* out, float* scratch);

// Attention's two products for 16 queries of one head (CpuBackend::attention;
// hd is 64 or 128). Keys are packed 16 to a block by pack_u (hd / 2 pair
// rows of 16 keys), values 32 to a step by pack_pairs (16 pair rows of hd).
// s[t * s_stride + 16 b + n] = q[t] . key n of block b for t < 16, b < n_blocks:
// q holds 16 bf16 rows of hd values, contiguous.
void attention_scores(const uint16_t* q, int64_t hd, const uint32_t* packed_k, int64_t n_blocks, float* s,
                      int64_t s_stride);
// o[t * hd + n] = sum_j p[t * ldp + j] v[j][n] for t < 16, j < 32 n_steps, n < hd:
// p holds 16 bf16 rows (ldp values apart) of the keys' weights.
void attention_values(const uint16_t* p, int64_t ldp, int64_t n_steps, const uint32_t* packed_v, int64_t hd,
                      float* o);

}  // namespace monet::cpu::amx
