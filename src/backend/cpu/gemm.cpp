// The GEMMs of gemm.h: float32 products in OpenBLAS sgemm (weights of other
// dtypes widened chunk by chunk); bf16 products in oneDNN's matmul (AMX or
// AVX-512-BF16), or emulated with bf16-rounded inputs where the CPU has neither.
#include "backend/cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <cblas.h>

#include <dnnl.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "backend/cpu/cpu_backend.h"
#include "core/threads.h"

namespace monet::cpu {

namespace {


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

// bf16 products with oneDNN's matmul: AMX tiles or AVX-512-BF16 dot
// products, whichever the CPU has (oneDNN picks at run time). Creating a
// primitive compiles its kernels, so they are kept, one per shape with its
// row count M: a primitive that leaves M open runs 10-20 % slower
// (bench/bench_gemm.cpp), and mixing the two would make a result depend on
// which shapes ran before (they sum in different orders).
class Bf16Matmul {
 public:
  static Bf16Matmul& instance() {
    static Bf16Matmul* m = new Bf16Matmul();  // never destroyed: used until the process ends
    return *m;
  }

  // C[M, N] (+)= A_bf16[M, K] . W (W bf16: [N, K] transposed, or [K, N])
  void run(int threads, const uint16_t* a_bf16, int64_t M, const Weight& W, bool transposed, float* C, int64_t ldc,
           bool accumulate) {
    const int64_t N = transposed ? W.rows : W.cols, K = transposed ? W.cols : W.rows;
    std::shared_ptr<Entry> e;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cache_.size() > 512) cache_.clear();  // prompts of many lengths: start over rather than grow
      std::shared_ptr<Entry>& slot = cache_[Key{M, N, K, ldc, transposed, accumulate}];
      if (!slot) slot = std::make_shared<Entry>(make(Key{M, N, K, ldc, transposed, accumulate}));
      e = slot;
    }
    using dnnl::memory;
    memory a(memory::desc({M, K}, memory::data_type::bf16, memory::dims{K, 1}), engine_,
             const_cast<uint16_t*>(a_bf16));
    memory w(e->pd.weights_desc(), engine_, const_cast<void*>(W.data));
    memory c(memory::desc({M, N}, memory::data_type::f32, memory::dims{ldc, 1}), engine_, C);
    // Our own scratchpad per calling thread: one primitive may run on several
    // threads at once (windows side by side), and the library's would be shared.
    static thread_local std::vector<uint8_t> scratch;
    scratch.resize(std::max<size_t>(1, e->pd.scratchpad_desc().get_size()));
    memory pad(e->pd.scratchpad_desc(), engine_, scratch.data());
    ScopedThreads team(threads);  // oneDNN's OpenMP runtime follows the calling thread's setting
    dnnl::stream stream(engine_);
    e->prim.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, c}, {DNNL_ARG_SCRATCHPAD, pad}});
    stream.wait();
  }

 private:
  struct Key {
    int64_t M, N, K, ldc;
    bool transposed, accumulate;
    bool operator<(const Key& o) const {
      return std::tie(M, N, K, ldc, transposed, accumulate) < std::tie(o.M, o.N, o.K, o.ldc, o.transposed, o.accumulate);
    }
  };
  struct Entry {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul prim;
  };

  Entry make(const Key& k) {
    using dnnl::memory;
    const memory::desc a({k.M, k.K}, memory::data_type::bf16, memory::dims{k.K, 1});
    const memory::desc w({k.K, k.N}, memory::data_type::bf16,
                         k.transposed ? memory::dims{1, k.K} : memory::dims{k.N, 1});
    const memory::desc c({k.M, k.N}, memory::data_type::f32, memory::dims{k.ldc, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (k.accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, w, c), attr, engine_);
    return {pd, dnnl::matmul(pd)};
  }

  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  std::mutex mutex_;
  std::map<Key, std::shared_ptr<Entry>> cache_;
};

}  // namespace

bool bf16_products_native() {
  // AMX, or AVX-512 with bf16 dot products (oneDNN's names for the ISAs).
  static const bool native = dnnl::get_effective_cpu_isa() >= dnnl::cpu_isa::avx512_core_bf16;
  return native;
}

bool bf16_tiles() {
  static const bool amx = dnnl::get_effective_cpu_isa() >= dnnl::cpu_isa::avx512_core_amx;
  return amx;
}

void gemm(const KernelSet& k, int threads, GemmCompute compute, const float* A, int64_t lda, int64_t M, const Weight& W,
          bool transposed, float* C, int64_t ldc, bool accumulate) {
  if (compute == GemmCompute::F32Split && bf16_tiles() && W.dtype == DType::BF16) {
    // a16 [3 M, K]: the hi parts of A's rows, then the mid parts, then the lo parts.
    const int64_t K = transposed ? W.cols : W.rows, N = transposed ? W.rows : W.cols;
    const int64_t n_parts = 3;
    static thread_local std::vector<uint16_t> a16;
    static thread_local std::vector<float> parts;  // [n_parts M, N]: the partial products
    a16.resize(size_t(n_parts * M * K));
    parts.resize(size_t(n_parts * M * N));
    uint16_t* hi = a16.data();
    uint16_t* mid = hi + M * K;
    uint16_t* lo = mid + M * K;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; m++)
      for (int64_t kk = 0; kk < K; kk++) {
        // Each remainder is exact in float32 (a float minus its nearest bf16).
        const float x = A[m * lda + kk];
        const uint16_t h = f32_to_bf16(x);
        const float r1 = x - bf16_to_f32(h);
        const uint16_t d = f32_to_bf16(r1);
        hi[m * K + kk] = h;
        mid[m * K + kk] = d;
        lo[m * K + kk] = f32_to_bf16(r1 - bf16_to_f32(d));
      }
    float* P = parts.data();
    Bf16Matmul::instance().run(threads, a16.data(), n_parts * M, W, transposed, P, N, /*accumulate=*/false);
    const float* p_mid = P + M * N;
    const float* p_lo = p_mid + M * N;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * N > (1 << 16))
    for (int64_t m = 0; m < M; m++)
      for (int64_t n = 0; n < N; n++) {
        const float v = P[m * N + n] + (p_mid[m * N + n] + p_lo[m * N + n]);
        C[m * ldc + n] = accumulate ? C[m * ldc + n] + v : v;
      }
    return;
  }
  if (compute == GemmCompute::BF16 && W.dtype == DType::BF16 && bf16_products_native()) {
    // Activations rounded to bf16 (nearest even), then oneDNN.
    const int64_t K = transposed ? W.cols : W.rows;
    static thread_local std::vector<uint32_t> a_bf16;
    a_bf16.resize(size_t(M * ((K + 1) / 2)));
    uint32_t* a32 = a_bf16.data();  // (the calling thread's buffer: thread_local is per thread)
    uint16_t* a16 = reinterpret_cast<uint16_t*>(a32);
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; m++) {
      // K even: rows of pairs; K odd: convert element by element into the packed rows
      if (K % 2 == 0) k.pack_bf16_pairs(A + m * lda, a32 + m * (K / 2), K);
      else
        for (int64_t kk = 0; kk < K; kk++) a16[m * K + kk] = f32_to_bf16(A[m * lda + kk]);
    }
    Bf16Matmul::instance().run(threads, a16, M, W, transposed, C, ldc, accumulate);
    return;
  }
  // float32 products in OpenBLAS sgemm: weights stored otherwise are widened
  // in chunks of rows (a few MB, cache-resident), never as whole matrices.
  // BF16 compute without bf16 hardware (or for weights not stored in bf16) is
  // emulated exactly: products of bf16-rounded inputs.
  const bool round = compute == GemmCompute::BF16;
  const int64_t N = transposed ? W.rows : W.cols, K = transposed ? W.cols : W.rows;
  ScopedThreads blas_threads(threads);  // OpenBLAS (OpenMP build) follows the calling thread's setting
  static thread_local std::vector<float> a_rounded, chunk;
  if (round) {
    a_rounded.resize(size_t(M * K));
    for (int64_t m = 0; m < M; m++)
      round_to_bf16(A + m * lda, K, a_rounded.data() + m * K);
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
      if (round) round_to_bf16(dst, W.cols, dst);
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
