// The GEMMs of gemm.h.
//
// float32 products: OpenBLAS sgemm (weights of other dtypes widened chunk by
// chunk). bf16 products (vdpbf16ps), BLIS-style:
//   for each block of K (KC values):
//     A[:, block] is packed once, shared by the threads: tiles of MR rows as
//       [KC/2][MR] bf16 pairs;
//     each thread takes panels of NR weight rows (columns of C): packs the
//       panel's block as [KC/2][NR] pairs (converting the weight's dtype), then
//       runs the micro-kernel over every MR-row tile of A into C[tile, panel].
// Block sizes keep a packed B panel in L1 (32 KB) and the packed A block in L2.
#include "backend/cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <cblas.h>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"

namespace monet::cpu {

namespace {

constexpr int64_t kKcBf16 = 512;  // K values per block (256 bf16 pairs)

// Bytes from the start of a row to its element `col` (a multiple of the block size).
size_t col_offset(const Weight& w, int64_t col) { return dtype_row_bytes(w.dtype, col); }

// out[0 .. n) = float32 of row r of w, columns [c0, c0 + n).
void weight_segment(const KernelSet& k, const Weight& w, int64_t r, int64_t c0, int64_t n, float* out, float* tmp) {
  const RowKernels* rk = k.rows(w.dtype);
  if (rk) {
    rk->to_f32(w.row(r) + size_t(c0) * dtype_size(w.dtype), out, n);
    return;
  }
  // Block-quantized: widen the whole blocks around the segment.
  const int64_t be = dtype_traits(w.dtype).block_elems;
  const int64_t b0 = c0 / be * be, b1 = std::min(w.cols, (c0 + n + be - 1) / be * be);
  dtype_traits(w.dtype).to_f32(w.row(r) + col_offset(w, b0), tmp, b1 - b0);
  std::memcpy(out, tmp + (c0 - b0), size_t(n) * sizeof(float));
}

// The packed bf16 GEMM (vdpbf16ps), for GemmCompute::BF16 where the CPU has it.
void packed_bf16_gemm(const KernelSet& k, int threads, const float* A, int64_t lda, int64_t M, const Weight& W,
                      bool transposed, float* C, int64_t ldc, bool accumulate) {
  const int64_t N = transposed ? W.rows : W.cols, K = transposed ? W.cols : W.rows;
  const int64_t MR = k.gemm_mr, NR = k.gemm_nr;
  const int64_t KC = kKcBf16, KP = KC / 2;
  const int64_t m_tiles = (M + MR - 1) / MR, k_blocks = (K + KC - 1) / KC, n_panels = (N + NR - 1) / NR;
  // Packed A, per k block: m_tiles tiles of [KC/2][MR] words (bf16 pairs).
  const int64_t tile_words = KP * MR;
  static thread_local std::vector<uint32_t> packed_a;
  packed_a.resize(size_t(k_blocks * m_tiles * tile_words));
  uint32_t* Ap = packed_a.data();
  const int64_t row_scratch = std::max(K, N) + 64;

#pragma omp parallel num_threads(threads)
  {
    // --- pack A: tile (kb, mt) holds rows mt*MR.., columns kb*KC.. ---
    uint32_t* pairs = reinterpret_cast<uint32_t*>(thread_scratch(2, size_t(KC)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < k_blocks * m_tiles; t++) {
      const int64_t kb = t / m_tiles, mt = t % m_tiles;
      const int64_t k0 = kb * KC, kc = std::min(KC, K - k0);
      uint32_t* tile = Ap + t * tile_words;
      std::fill(tile, tile + tile_words, 0u);
      for (int64_t r = 0; r < MR && mt * MR + r < M; r++) {
        k.pack_bf16_pairs(A + (mt * MR + r) * lda + k0, pairs, kc);
        for (int64_t p = 0; p < (kc + 1) / 2; p++) tile[p * MR + r] = pairs[p];
      }
    }
    // (the implicit barrier of omp for: A is packed)

    // --- panels of NR weight rows / columns: Bp[p][j] = bf16 pair of k = k0 + 2p, k0 + 2p + 1 ---
    uint32_t* Bp = reinterpret_cast<uint32_t*>(thread_scratch(0, size_t(KP * NR)));
    float* seg = thread_scratch(1, size_t(row_scratch));
    float* seg2 = thread_scratch(4, size_t(row_scratch));
    float* tmp = thread_scratch(3, size_t(row_scratch));
#pragma omp for schedule(dynamic, 1)
    for (int64_t np = 0; np < n_panels; np++) {
      const int64_t n0 = np * NR, nc = std::min(NR, N - n0);
      for (int64_t kb = 0; kb < k_blocks; kb++) {
        const int64_t k0 = kb * KC, kc = std::min(KC, K - k0), kp = (kc + 1) / 2;
        std::fill(Bp, Bp + kp * NR, 0u);
        if (transposed) {
          for (int64_t j = 0; j < nc; j++) {
            if (W.dtype == DType::BF16 && kc % 2 == 0) {  // the row's bf16 pairs as they are stored
              const uint8_t* src = W.row(n0 + j) + size_t(k0) * 2;
              for (int64_t p = 0; p < kp; p++) std::memcpy(&Bp[p * NR + j], src + 4 * p, 4);
              continue;
            }
            weight_segment(k, W, n0 + j, k0, kc, seg, tmp);
            k.pack_bf16_pairs(seg, pairs, kc);
            for (int64_t p = 0; p < kp; p++) Bp[p * NR + j] = pairs[p];
          }
        } else {
          for (int64_t p = 0; p < kp; p++) {
            weight_segment(k, W, k0 + 2 * p, n0, nc, seg, tmp);
            if (2 * p + 1 < kc) weight_segment(k, W, k0 + 2 * p + 1, n0, nc, seg2, tmp);
            else std::fill(seg2, seg2 + nc, 0.0f);
            for (int64_t j = 0; j < nc; j++) {
              const float two[2] = {seg[j], seg2[j]};
              k.pack_bf16_pairs(two, &Bp[p * NR + j], 2);
            }
          }
        }
        // C[tile, panel] (+)= A tile . B panel
        for (int64_t mt = 0; mt < m_tiles; mt++)
          k.gemm_bf16(Ap + (kb * m_tiles + mt) * tile_words, Bp, kp, C + mt * MR * ldc + n0, ldc,
                      std::min(MR, M - mt * MR), nc, accumulate || kb > 0);
      }
    }
  }
}

}  // namespace

void gemm(const KernelSet& k, int threads, GemmCompute compute, const float* A, int64_t lda, int64_t M, const Weight& W,
          bool transposed, float* C, int64_t ldc, bool accumulate) {
  if (compute == GemmCompute::BF16 && k.gemm_bf16) {
    packed_bf16_gemm(k, threads, A, lda, M, W, transposed, C, ldc, accumulate);
    return;
  }
  // float32 products in OpenBLAS sgemm: weights stored otherwise are widened
  // in chunks of rows (a few MB, cache-resident), never as whole matrices.
  // Without a bf16 dot product, BF16 compute is emulated exactly: products of
  // bf16-rounded inputs.
  const bool round = compute == GemmCompute::BF16;
  const int64_t N = transposed ? W.rows : W.cols, K = transposed ? W.cols : W.rows;
  ScopedThreads blas_threads(threads);  // OpenBLAS (OpenMP build) follows the calling thread's setting
  auto rounded = [](float x) { return bf16_to_f32(f32_to_bf16(x)); };
  static thread_local std::vector<float> a_rounded, chunk;
  if (round) {
    a_rounded.resize(size_t(M * K));
    for (int64_t m = 0; m < M; m++)
      for (int64_t kk = 0; kk < K; kk++) a_rounded[size_t(m * K + kk)] = rounded(A[m * lda + kk]);
    A = a_rounded.data();
    lda = K;
  }
  const CBLAS_TRANSPOSE tb = transposed ? CblasTrans : CblasNoTrans;
  if (W.dtype == DType::F32 && !round) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, int(M), int(N), int(K), 1.0f, A, int(lda),
                static_cast<const float*>(W.data), int(W.cols), accumulate ? 1.0f : 0.0f, C, int(ldc));
    return;
  }
  // Chunks of stored rows: NT: rows are output columns; NN: rows are K.
  const int64_t rows_per_chunk = std::max<int64_t>(16, (int64_t(16) << 20) / (W.cols * int64_t(sizeof(float))));
  chunk.resize(size_t(std::min(rows_per_chunk, W.rows) * W.cols));
  for (int64_t r0 = 0; r0 < W.rows; r0 += rows_per_chunk) {
    const int64_t nr = std::min(rows_per_chunk, W.rows - r0);
    float* wc = chunk.data();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < nr; r++) {
      float* dst = wc + r * W.cols;
      weight_segment(k, W, r0 + r, 0, W.cols, dst, thread_scratch(3, size_t(W.cols) + 64));
      if (round)
        for (int64_t c = 0; c < W.cols; c++) dst[c] = rounded(dst[c]);
    }
    if (transposed)  // C[:, r0:r0+nr] (+)= A . Wc^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(nr), int(K), 1.0f, A, int(lda), wc,
                  int(W.cols), accumulate ? 1.0f : 0.0f, C + r0, int(ldc));
    else  // C (+)= A[:, r0:r0+nr] . Wc
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(N), int(nr), 1.0f, A + r0, int(lda), wc,
                  int(N), accumulate || r0 > 0 ? 1.0f : 0.0f, C, int(ldc));
  }
}

}  // namespace monet::cpu
