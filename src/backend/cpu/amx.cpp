// AMX tile kernels (amx.h). Built with -mamx-tile -mamx-bf16 -mavx512f
// -mavx512bw (CMakeLists.txt); without a compiler that knows them the
// functions exist and usable() is false.
#include "backend/cpu/amx.h"

#include "backend/cpu/gemm.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
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

}  // namespace

bool usable() { return bf16_tiles(); }  // oneDNN's check also asks the kernel for the tile state

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
        __m256i t[8], q[8];
        for (int n = 0; n < 8; n += 2) {
          t[n] = _mm256_unpacklo_epi32(v[n], v[n + 1]);  // pairs 0,1 | 4,5 of rows n, n+1
          t[n + 1] = _mm256_unpackhi_epi32(v[n], v[n + 1]);  // pairs 2,3 | 6,7
        }
        for (int h = 0; h < 8; h += 4) {
          q[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);      // pair 0 | 4 of rows h..h+3
          q[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);  // pair 1 | 5
          q[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);  // pair 2 | 6
          q[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);  // pair 3 | 7
        }
        for (int j = 0; j < 4; j++) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (r0 + j) * w + n0),
                              _mm256_permute2x128_si256(q[j], q[4 + j], 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (r0 + 4 + j) * w + n0),
                              _mm256_permute2x128_si256(q[j], q[4 + j], 0x31));
        }
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
               float* const* out, int64_t nt, float* c) {
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
    add_to_out(n0, 48);
  }
  for (; n0 < N; n0 += 16) {
    _tile_zero(4);
    _tile_loadd(1, packed + n0, b_stride);
    _tile_dpbf16ps(4, 0, 1);
    _tile_stored(4, c, c_stride);
    add_to_out(n0, 16);
  }
  _tile_release();
}

#else  // no AMX in this compiler: never usable, never called

bool usable() { return false; }
void pack_u(const uint16_t*, size_t, int64_t, int64_t, uint32_t*) {}
void dot_tile(const uint16_t* const*, int64_t, const uint32_t*, int64_t, int64_t, float*) {}
void pack_pairs(const uint16_t* const*, int64_t, int64_t, uint32_t*) {}
void axpy_tile(const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float* const*, int64_t, float*) {}

#endif

}  // namespace monet::cpu::amx
