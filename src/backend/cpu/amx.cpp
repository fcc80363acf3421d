// AMX tile kernels (amx.h). Built with -mamx-tile -mamx-bf16 -mamx-int8
// -mavx512f -mavx512bw -mavx512vl -mf16c (CMakeLists.txt); without a compiler that
// knows them the functions exist and usable() is false.
#include "backend/cpu/amx.h"

#include "backend/cpu/gemm.h"
#include "backend/cpu/kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BW__) && defined(__F16C__)
#include <immintrin.h>
#define MONET_AMX 1
#endif

namespace monet::cpu::amx {

#if MONET_AMX

namespace {

// The tile configuration (palette 1): rows and bytes per row of tiles 0-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int nrows, int bytes_per_row) {
    rows[tile] = uint8_t(nrows);
    colsb[tile] = uint16_t(bytes_per_row);
  }
  void load() const {
    __asm__ __volatile__("" : : "r"(this) : "memory");  // GCC does not see ldtilecfg read the struct
    _tile_loadconfig(this);
  }
};

// GCC's tile loads and stores are asm that takes only the address: a
// compiler barrier between them and the vector loads and stores of the same
// memory keeps those from being moved across or dropped.
inline void memory_barrier() { __asm__ __volatile__("" : : : "memory"); }

// v[n] (8 words each) -> t[r] = (v[0][r], ..., v[7][r]): an 8 x 8 transpose of 32-bit words.
void transpose_8x8_words(const __m256i* v, __m256i* out) {
  __m256i t[8], q[8];
  for (int n = 0; n < 8; n += 2) {
    t[n] = _mm256_unpacklo_epi32(v[n], v[n + 1]);      // words 0,1 | 4,5 of rows n, n+1
    t[n + 1] = _mm256_unpackhi_epi32(v[n], v[n + 1]);  // words 2,3 | 6,7
  }
  for (int h = 0; h < 8; h += 4) {
    q[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);          // word 0 | 4 of rows h..h+3
    q[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);      // word 1 | 5
    q[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);  // word 2 | 6
    q[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);  // word 3 | 7
  }
  for (int j = 0; j < 4; j++) {
    out[j] = _mm256_permute2x128_si256(q[j], q[4 + j], 0x20);
    out[4 + j] = _mm256_permute2x128_si256(q[j], q[4 + j], 0x31);
  }
}

// One B tile of the int8 products, then its 16 scales: column n holds the
// 32 quants q[n] (null: zeros) as 8 rows of 4, i.e. B's row r is word r of
// each column's 8 words: two 8 x 8 transposes (columns 0-7, 8-15).
void pack_b_tile(const int8_t* const* q, const float* scales, uint8_t* tile) {
  for (int half = 0; half < 2; half++) {
    __m256i v[8], t[8];
    for (int n = 0; n < 8; n++) {
      const int8_t* col = q[half * 8 + n];
      v[n] = col ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col)) : _mm256_setzero_si256();
    }
    transpose_8x8_words(v, t);
    for (int r = 0; r < 8; r++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * 64 + half * 32), t[r]);
  }
  std::memcpy(tile + 8 * 64, scales, 16 * sizeof(float));
}

// The int8 kernels' block step: block b's products into C tile b % 2 (from
// zero), A (tile 2 or 3) read from a, a_stride bytes a row, B (4 or 5) from bt.
void int8_block_products(int64_t b, const void* a, size_t a_stride, const void* bt) {
  if (b % 2 == 0) {
    _tile_loadd(2, a, a_stride);
    _tile_loadd(4, bt, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 2, 4);
  } else {
    _tile_loadd(3, a, a_stride);
    _tile_loadd(5, bt, 64);
    _tile_zero(1);
    _tile_dpbssd(1, 3, 5);
  }
}
// After block b's products are issued: block b - 1's sums, stored a step
// before, scaled into the sums (scale_add(b - 1, its 16 x 16 int32)) while
// the tiles run, then block b's stored to c + (b % 2) * 256.
template <class ScaleAdd>
void scale_previous_store(int64_t b, int32_t* c, const ScaleAdd& scale_add) {
  memory_barrier();  // the tile stores of block b - 1 before their reads
  if (b > 0) scale_add(b - 1, c + ((b - 1) % 2) * 256);
  memory_barrier();  // their reads before the next tile store to the same c
  if (b % 2 == 0) _tile_stored(0, c, 64);
  else _tile_stored(1, c + 256, 64);
}
// acc[i] = fma(float(c[i][:]), row_scale[i] * col_scales, acc[i]) for the 16
// rows of a block's int32 sums c (16 x 16).
void scale_add_block(__m512* acc, const int32_t* c, const float* row_scale, __m512 col_scales) {
  for (int i = 0; i < 16; i++)
    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + i * 16)),
                             _mm512_mul_ps(_mm512_set1_ps(row_scale[i]), col_scales), acc[i]);
}

}  // namespace

// oneDNN's check (its AMX level has the bf16 and the int8 tiles) also asks
// the kernel for the tile state.
bool usable() { return bf16_tiles(); }

void pack_u(const uint16_t* u, size_t row_bytes, int64_t w, int64_t K, uint32_t* packed) {
  // A transpose of w rows of K/2 pairs (32-bit words).
  auto row = [&](int64_t n) {
    return reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(u) + size_t(n) * row_bytes);
  };
  if (w % 8 == 0) {
    // 8 x 8 blocks of words: rows n0..n0+7, pairs r0..r0+7.
    for (int64_t n0 = 0; n0 < w; n0 += 8)
      for (int64_t r0 = 0; r0 < K / 2; r0 += 8) {
        __m256i v[8];
        for (int n = 0; n < 8; n++) v[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row(n0 + n) + r0));
        __m256i t[8];
        transpose_8x8_words(v, t);
        for (int j = 0; j < 8; j++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (r0 + j) * w + n0), t[j]);
      }
    return;
  }
  // Other widths: 16 pairs of a row at a time, lane r scattered to packed[(r0 + r) * w + n].
  const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(int(w)));
  for (int64_t n = 0; n < w; n++)
    for (int64_t r0 = 0; r0 < K / 2; r0 += 16)
      _mm512_i32scatter_epi32(packed + r0 * w + n, stride, _mm512_loadu_si512(row(n) + r0), 4);
}

void dot_tile(const uint16_t* const* a_rows, int64_t nt, const uint32_t* packed, int64_t w, int64_t K, float* c) {
  // Tiles 0, 1: two partial sums of C (even and odd 32-value steps of K, so
  // consecutive products do not wait on each other); 2, 3: A; 4, 5: B.
  TileConfig cfg;
  cfg.set(0, 16, int(w * 4));
  cfg.set(1, 16, int(w * 4));
  cfg.set(2, 16, 64);
  cfg.set(3, 16, 64);
  cfg.set(4, 16, int(w * 4));
  cfg.set(5, 16, int(w * 4));
  cfg.load();
  _tile_zero(0);
  _tile_zero(1);
  // Each step's A (16 tokens x 32 values) is gathered from the tokens' rows
  // into 1 KB of a ring that stays in L1, kAhead steps before its tile load:
  // a tile load right after the stores to its rows waits for them (about
  // 15 ns a step; 1 KB stored a few steps before loads at L1 speed). Rows past
  // nt repeat row 0: their sums are ignored.
  constexpr int64_t kAhead = 4;
  alignas(64) uint16_t a_ring[kAhead][16 * 32];
  const uint16_t* rows[16];
  for (int64_t t = 0; t < 16; t++) rows[t] = a_rows[t < nt ? t : 0];
  auto gather = [&](int64_t step) {
    uint16_t* dst = a_ring[step % kAhead];
    memory_barrier();  // after the tile load that read this slot last
    for (int t = 0; t < 16; t++) _mm512_store_si512(dst + t * 32, _mm512_loadu_si512(rows[t] + step * 32));
    memory_barrier();  // before the tile load of this slot
  };
  const size_t b_stride = size_t(w) * 4;
  const int64_t steps = K / 32;
  for (int64_t step = 0; step < kAhead && step < steps; step++) gather(step);
  int64_t step = 0;
  for (; step + 2 <= steps; step += 2) {
    _tile_loadd(2, a_ring[step % kAhead], 64);
    _tile_loadd(4, packed + step * 16 * w, b_stride);
    _tile_dpbf16ps(0, 2, 4);
    if (step + kAhead < steps) gather(step + kAhead);  // into the slot just loaded
    _tile_loadd(3, a_ring[(step + 1) % kAhead], 64);
    _tile_loadd(5, packed + (step + 1) * 16 * w, b_stride);
    _tile_dpbf16ps(1, 3, 5);
    if (step + 1 + kAhead < steps) gather(step + 1 + kAhead);
  }
  if (step < steps) {  // K % 64 == 32
    _tile_loadd(2, a_ring[step % kAhead], 64);
    _tile_loadd(4, packed + step * 16 * w, b_stride);
    _tile_dpbf16ps(0, 2, 4);
  }
  alignas(64) float odd[16 * 16];
  _tile_stored(0, c, b_stride);
  _tile_stored(1, odd, b_stride);
  _tile_release();
  memory_barrier();
  for (int64_t i = 0; i < 16 * w; i++) c[i] += odd[i];
}

void pack_pairs(const uint16_t* const* rows, int64_t n_rows, int64_t N, uint32_t* packed) {
  for (int64_t r = 0; r < (n_rows + 1) / 2; r++) {
    const uint16_t* lo = rows[2 * r];
    const uint16_t* hi = 2 * r + 1 < n_rows ? rows[2 * r + 1] : nullptr;
    uint32_t* out = packed + r * N;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + n)));
      const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + n)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(out + n, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    for (; n < N; n++) out[n] = uint32_t(lo[n]) | (hi ? uint32_t(hi[n]) << 16 : 0u);
  }
}

void axpy_tile(const uint16_t* a, int64_t lda, int64_t pair_rows, const uint32_t* packed, int64_t N,
               float* const* out, int64_t nt, float* c, RowPrefetch* prefetch) {
  const int64_t prefetch_per_block = prefetch ? (prefetch->n_rows * prefetch->row_lines + N / 48) / (N / 48 + 1) : 0;
  // Tile 0: A (16 x 2 * pair_rows); 1-3: B of three 16-column blocks; 4-6: their C.
  TileConfig cfg;
  cfg.set(0, 16, int(pair_rows * 4));
  for (int t = 1; t <= 3; t++) cfg.set(t, int(pair_rows), 64);
  for (int t = 4; t <= 6; t++) cfg.set(t, 16, 64);
  cfg.load();
  _tile_loadd(0, a, size_t(lda) * 2);
  // Each 48 (or 16) columns' products go to c and are added to the tokens'
  // rows right away, while that piece of c is in L1 (c[16, 48] reused).
  auto add_to_out = [&](int64_t n0, int64_t width) {
    memory_barrier();  // after the tile stores to c
    for (int64_t t = 0; t < nt; t++) {
      float* o = out[t] + n0;
      const float* ct = c + t * 48;  // (kAxpyScratchFloats: 16 rows of 48)
      for (int64_t n = 0; n < width; n += 16) _mm512_storeu_ps(o + n, _mm512_add_ps(_mm512_loadu_ps(o + n), _mm512_loadu_ps(ct + n)));
    }
    memory_barrier();  // before the next tile stores to c
  };
  constexpr size_t c_stride = 48 * 4;
  const size_t b_stride = size_t(N) * 4;
  int64_t n0 = 0;
  for (; n0 + 48 <= N; n0 += 48) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_loadd(1, packed + n0, b_stride);
    _tile_loadd(2, packed + n0 + 16, b_stride);
    _tile_loadd(3, packed + n0 + 32, b_stride);
    _tile_dpbf16ps(4, 0, 1);
    _tile_dpbf16ps(5, 0, 2);
    _tile_dpbf16ps(6, 0, 3);
    _tile_stored(4, c, c_stride);
    _tile_stored(5, c + 16, c_stride);
    _tile_stored(6, c + 32, c_stride);
    if (prefetch) prefetch->issue(prefetch_per_block);  // (plain loads' hints: the tiles stay as they are)
    add_to_out(n0, 48);
  }
  for (; n0 < N; n0 += 16) {
    _tile_zero(4);
    _tile_loadd(1, packed + n0, b_stride);
    _tile_dpbf16ps(4, 0, 1);
    _tile_stored(4, c, c_stride);
    add_to_out(n0, 16);
  }
  if (prefetch) prefetch->issue(prefetch->n_rows * prefetch->row_lines);  // (the lines left)
  _tile_release();
}

void attention_scores(const uint16_t* q, int64_t hd, const uint32_t* packed_k, int64_t n_blocks, float* s,
                      int64_t s_stride) {
  // Tiles 0-3: the queries' hd / 32 steps (A, loaded once); 4, 5: the scores
  // of two key blocks (C, independent chains); 6, 7: their keys (B). (Tile
  // numbers are spelled out: GCC's tile intrinsics paste them into the asm.)
  const int64_t steps = hd / 32, block_words = hd / 2 * 16;
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.set(t, 16, 64);
  cfg.load();
  const size_t q_stride = size_t(hd) * 2, s_bytes = size_t(s_stride) * 4;
  _tile_loadd(0, q, q_stride);
  if (steps > 1) _tile_loadd(1, q + 32, q_stride);
  if (steps > 2) _tile_loadd(2, q + 64, q_stride);
  if (steps > 3) _tile_loadd(3, q + 96, q_stride);
// C += A(step) B(the block's keys of the step: 16 pair rows, 256 words)
#define MONET_SCORE_STEP(C, A, B, kb) \
  do {                                \
    _tile_loadd(B, (kb) + 256 * A, 64); \
    _tile_dpbf16ps(C, A, B);          \
  } while (0)
#define MONET_SCORE_BLOCK(C, B, kb)                   \
  do {                                                \
    MONET_SCORE_STEP(C, 0, B, kb);                    \
    if (steps > 1) MONET_SCORE_STEP(C, 1, B, kb);     \
    if (steps > 2) MONET_SCORE_STEP(C, 2, B, kb);     \
    if (steps > 3) MONET_SCORE_STEP(C, 3, B, kb);     \
  } while (0)
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
    _tile_zero(4);
    _tile_zero(5);
    MONET_SCORE_BLOCK(4, 6, packed_k + b * block_words);
    MONET_SCORE_BLOCK(5, 7, packed_k + (b + 1) * block_words);
    _tile_stored(4, s + b * 16, s_bytes);
    _tile_stored(5, s + (b + 1) * 16, s_bytes);
  }
  if (b < n_blocks) {
    _tile_zero(4);
    MONET_SCORE_BLOCK(4, 6, packed_k + b * block_words);
    _tile_stored(4, s + b * 16, s_bytes);
  }
#undef MONET_SCORE_BLOCK
#undef MONET_SCORE_STEP
  _tile_release();
  memory_barrier();
}

void attention_values(const uint16_t* p, int64_t ldp, int64_t n_steps, const uint32_t* packed_v, int64_t hd,
                      float* o) {
  // Tiles 0-3: the output's 64 columns at a time (C, over every key step);
  // 4, 5: the step's weights (A, 16 queries x 32 keys); 6, 7: the values
  // (B: 16 pair rows x 16 columns).
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.set(t, 16, 64);
  cfg.load();
  const size_t p_stride = size_t(ldp) * 2, v_stride = size_t(hd) * 4, o_stride = size_t(hd) * 4;
#define MONET_VALUE_STEP(A, j)                          \
  do {                                                  \
    const uint32_t* vb = packed_v + (j) * 16 * hd + c0; \
    _tile_loadd(A, p + (j) * 32, p_stride);             \
    _tile_loadd(6, vb, v_stride);                       \
    _tile_dpbf16ps(0, A, 6);                            \
    _tile_loadd(7, vb + 16, v_stride);                  \
    _tile_dpbf16ps(1, A, 7);                            \
    _tile_loadd(6, vb + 32, v_stride);                  \
    _tile_dpbf16ps(2, A, 6);                            \
    _tile_loadd(7, vb + 48, v_stride);                  \
    _tile_dpbf16ps(3, A, 7);                            \
  } while (0)
  for (int64_t c0 = 0; c0 < hd; c0 += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    int64_t st = 0;
    for (; st + 2 <= n_steps; st += 2) {
      MONET_VALUE_STEP(4, st);
      MONET_VALUE_STEP(5, st + 1);
    }
    if (st < n_steps) MONET_VALUE_STEP(4, st);
    _tile_stored(0, o + c0, o_stride);
    _tile_stored(1, o + c0 + 16, o_stride);
    _tile_stored(2, o + c0 + 32, o_stride);
    _tile_stored(3, o + c0 + 48, o_stride);
  }
#undef MONET_VALUE_STEP
  _tile_release();
  memory_barrier();
}

// A tile of 16 tokens' block b: their quants as the int8 products' second
// operand (8 rows of 4 quants per token: row r holds quants 4r..4r+3 of
// tokens 0..15), then the 16 tokens' scales.
constexpr int64_t kQ8TokenTileBytes = 8 * 64 + 16 * 4;

int64_t q8_tokens_bytes(int64_t T, int64_t nb) { return (T + 15) / 16 * nb * kQ8TokenTileBytes; }

void pack_q8_tokens(const BlockQ8Act* x, int64_t T, int64_t nb, uint8_t* packed) {
  for (int64_t t0 = 0; t0 < T; t0 += 16)
    for (int64_t b = 0; b < nb; b++) {
      const int8_t* q[16];
      float scales[16];
      for (int64_t t = 0; t < 16; t++) {
        const BlockQ8Act* xb = t0 + t < T ? &x[(t0 + t) * nb + b] : nullptr;
        q[t] = xb ? xb->q : nullptr;
        scales[t] = xb ? xb->d : 0.0f;
      }
      pack_b_tile(q, scales, packed + (t0 / 16 * nb + b) * kQ8TokenTileBytes);
    }
}

// q8_dot_rows_tile: dw [nb][16], c [2][256], out [256]; q8_dot_slice_tile: ring [4][128], c [2][256]
int64_t q8_tile_scratch_floats(int64_t nb) { return 16 * nb + 4 * 256; }

void q8_dot_rows_tile(const void* rows, size_t row_bytes, int64_t nrows, const uint8_t* packed, int64_t T, int64_t nb,
                      float* y, int64_t ystride, const void* next, float* scratch) {
  // Tiles 0, 1: C of even and odd blocks (a block's products are scaled
  // from memory while the next block's run); 2, 3: A (the rows' quants of a
  // block, read in place: 32 bytes at block b of each row); 4, 5: B.
  TileConfig cfg;
  for (int t = 0; t < 2; t++) {
    cfg.set(t, int(nrows), 64);
    cfg.set(2 + t, int(nrows), 32);
    cfg.set(4 + t, 8, 64);
  }
  cfg.load();
  const uint8_t* base = static_cast<const uint8_t*>(rows);
  // dw[b * 16 + r]: the rows' block scales (rows past nrows: 0)
  float* dw = scratch;
  int32_t* c = reinterpret_cast<int32_t*>(scratch + 16 * nb);  // [2][16 rows][16 tokens]
  float* out = scratch + 16 * nb + 2 * 256;                    // [16 rows][16 tokens]
  for (int64_t b = 0; b < nb; b++)
    for (int64_t r = 0; r < 16; r++) {
      uint16_t h = 0;
      if (r < nrows) std::memcpy(&h, base + size_t(r) * row_bytes + size_t(b) * sizeof(BlockQ8_0), 2);
      dw[b * 16 + r] = r < nrows ? _cvtsh_ss(h) : 0.0f;
    }
  // The next rows' bytes, a few lines per block step over all the steps.
  const char* ahead = static_cast<const char*>(next);
  const int64_t token_tiles = (T + 15) / 16, steps = token_tiles * nb;
  const int64_t lines = (16 * int64_t(row_bytes) + 63) / 64, per_step = (lines + steps - 1) / steps;
  const size_t q_offset = offsetof(BlockQ8_0, q);
  for (int64_t tt = 0; tt < token_tiles; tt++) {
    const uint8_t* tiles = packed + tt * nb * kQ8TokenTileBytes;
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    // acc[r][t] = fma(float(c[r][t]), dw[r] * dx[t], acc[r][t]) for block b
    auto scale_add = [&](int64_t b, const int32_t* cb) {
      scale_add_block(acc, cb, dw + b * 16, _mm512_loadu_ps(reinterpret_cast<const float*>(tiles + b * kQ8TokenTileBytes + 8 * 64)));
    };
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t* a = base + size_t(b) * sizeof(BlockQ8_0) + q_offset;
      const uint8_t* bt = tiles + b * kQ8TokenTileBytes;
      int8_block_products(b, a, row_bytes, bt);
      if (ahead) {
        const int64_t step = tt * nb + b;
        for (int64_t l = step * per_step; l < (step + 1) * per_step && l < lines; l++)
          _mm_prefetch(ahead + l * 64, _MM_HINT_T0);
      }
      scale_previous_store(b, c, scale_add);
    }
    memory_barrier();
    scale_add(nb - 1, c + ((nb - 1) % 2) * 256);
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(out + r * 16, acc[r]);
    for (int64_t t = 0; t < 16 && tt * 16 + t < T; t++)
      for (int64_t r = 0; r < nrows; r++) y[(tt * 16 + t) * ystride + r] = out[r * 16 + t];
  }
  _tile_release();
}

int64_t q8_slice_bytes(int64_t nb) { return nb * kQ8TokenTileBytes; }

void pack_q8_slice(const void* rows, size_t row_bytes, int64_t w, int64_t nb, uint8_t* packed) {
  const uint8_t* base = static_cast<const uint8_t*>(rows);
  for (int64_t b = 0; b < nb; b++) {
    const int8_t* q[16];
    float scales[16];
    for (int64_t n = 0; n < 16; n++) {
      const BlockQ8_0* blk = n < w ? reinterpret_cast<const BlockQ8_0*>(base + size_t(n) * row_bytes) + b : nullptr;
      uint16_t h = 0;
      if (blk) std::memcpy(&h, &blk->d, 2);
      q[n] = blk ? blk->q : nullptr;
      scales[n] = blk ? _cvtsh_ss(h) : 0.0f;
    }
    pack_b_tile(q, scales, packed + b * kQ8TokenTileBytes);
  }
}

void q8_dot_slice_tile(const BlockQ8Act* const* x, int64_t nt, const uint8_t* packed, int64_t w, int64_t nb,
                       float* out, float* scratch) {
  // Tiles 0, 1: C of even and odd blocks (as q8_dot_rows_tile); 2, 3: A (the
  // tokens' quants of a block, gathered into a ring kAhead blocks ahead:
  // a tile load right after the stores to its rows waits for them); 4, 5: B.
  TileConfig cfg;
  for (int t = 0; t < 2; t++) {
    cfg.set(t, 16, 64);
    cfg.set(2 + t, 16, 32);
    cfg.set(4 + t, 8, 64);
  }
  cfg.load();
  constexpr int64_t kAhead = 4;
  int8_t* ring = reinterpret_cast<int8_t*>(scratch);                 // [kAhead][16 tokens][32]
  int32_t* c = reinterpret_cast<int32_t*>(scratch + kAhead * 128);  // [2][16 tokens][16 rows]
  const BlockQ8Act* tok[16];
  for (int64_t t = 0; t < 16; t++) tok[t] = x[t < nt ? t : 0];  // rows past nt repeat token 0 (ignored)
  // The tokens' scales of the blocks gathered: a block's are read when the
  // next block's products run, after 5 more blocks were gathered (6 slots
  // would do; 8).
  float dx[2 * kAhead][16];
  auto gather = [&](int64_t b) {
    int8_t* dst = ring + (b % kAhead) * 512;
    memory_barrier();  // after the tile load that read this slot last
    for (int t = 0; t < 16; t++) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t * 32), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tok[t][b].q)));
      dx[b % (2 * kAhead)][t] = tok[t][b].d;
    }
    memory_barrier();  // before the tile load of this slot
  };
  __m512 acc[16];
  for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
  // acc[t][n] = fma(float(c[t][n]), dx[t] * dw[n], acc[t][n]) for block b
  auto scale_add = [&](int64_t b, const int32_t* cb) {
    scale_add_block(acc, cb, dx[b % (2 * kAhead)], _mm512_loadu_ps(reinterpret_cast<const float*>(packed + b * kQ8TokenTileBytes + 8 * 64)));
  };
  for (int64_t b = 0; b < kAhead && b < nb; b++) gather(b);
  for (int64_t b = 0; b < nb; b++) {
    const int8_t* a = ring + (b % kAhead) * 512;
    const uint8_t* bt = packed + b * kQ8TokenTileBytes;
    int8_block_products(b, a, 32, bt);
    if (b + kAhead < nb) gather(b + kAhead);  // into the slot just loaded
    scale_previous_store(b, c, scale_add);
  }
  memory_barrier();
  scale_add(nb - 1, c + ((nb - 1) % 2) * 256);
  _tile_release();
  const __mmask16 lanes = __mmask16((1u << w) - 1u);
  for (int64_t t = 0; t < nt; t++) _mm512_mask_storeu_ps(out + t * w, lanes, acc[t]);
}

#else  // no AMX in this compiler: never usable, never called

bool usable() { return false; }
void pack_u(const uint16_t*, size_t, int64_t, int64_t, uint32_t*) {}
void dot_tile(const uint16_t* const*, int64_t, const uint32_t*, int64_t, int64_t, float*) {}
void pack_pairs(const uint16_t* const*, int64_t, int64_t, uint32_t*) {}
void axpy_tile(const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float* const*, int64_t, float*,
               RowPrefetch*) {}
int64_t q8_tokens_bytes(int64_t, int64_t) { return 0; }
void pack_q8_tokens(const BlockQ8Act*, int64_t, int64_t, uint8_t*) {}
int64_t q8_tile_scratch_floats(int64_t) { return 0; }
void q8_dot_rows_tile(const void*, size_t, int64_t, const uint8_t*, int64_t, int64_t, float*, int64_t, const void*, float*) {}
int64_t q8_slice_bytes(int64_t) { return 0; }
void pack_q8_slice(const void*, size_t, int64_t, int64_t, uint8_t*) {}
void q8_dot_slice_tile(const BlockQ8Act* const*, int64_t, const uint8_t*, int64_t, int64_t, float*, float*) {}
void attention_scores(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t) {}
void attention_values(const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float*) {}

#endif

}  // namespace monet::cpu::amx
