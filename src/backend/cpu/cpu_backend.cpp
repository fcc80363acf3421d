#include "backend/cpu/cpu_backend.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <mutex>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "backend/cpu/amx.h"
#include "backend/cpu/gemm.h"
#include "core/huge_pages.h"
#include "core/monet_math.h"
#include "core/threads.h"
#include "monet/error.h"
#include "monet/memory.h"

namespace monet::cpu {

float* thread_scratch(int slot, size_t n) {
  static thread_local std::vector<float> buffers[8];
  std::vector<float>& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

namespace {

// Weight rows as float32: the row kernels read F32/F16/BF16 in place; other
// weight types (Q8_0) are widened through their dtype traits.
const float* row_f32(const Weight& w, int64_t r, float* scratch) {
  w.rows_to_f32(r, 1, scratch);
  return scratch;
}

}  // namespace

CpuBackend::CpuBackend(int threads, const KernelSet& kernels, Compute compute, bool huge_pages, bool copies_of_mapped)
    : threads_(threads > 0 ? threads : omp_get_num_procs()),
      k_(kernels),
      compute_(compute),
      huge_pages_(huge_pages),
      copies_of_mapped_(copies_of_mapped) {}

std::string CpuBackend::name() const {
  const char* arith = compute_ == Compute::F32 ? "f32 products"
                      : compute_ == Compute::BF16 ? (bf16_products_native() ? "bf16 products" : "bf16 products (emulated)")
                      : bf16_products_native() ? "bf16 products for bf16 weights" : "f32 products";
  return std::string("cpu (") + k_.name + " kernels, " + std::to_string(threads_) + " threads, " + arith + ")";
}

namespace {

// Activation buffers come and go with every forward call; fresh large blocks
// would be page-faulted and zeroed by the kernel each time. Freed blocks are
// kept by size class (powers of two) for reuse, up to kCacheLimit bytes.
class BlockCache {
 public:
  static constexpr size_t kHeader = 64;           // keeps the payload 64-byte aligned
  static constexpr size_t kCacheLimit = size_t(1) << 30;

  void* get(size_t bytes) {
    const int cls = size_class(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& list = free_[size_t(cls)];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        cached_ -= size_t(1) << cls;
        return p;
      }
    }
    uint8_t* block = static_cast<uint8_t*>(std::aligned_alloc(64, kHeader + (size_t(1) << cls)));
    if (!block) return nullptr;
    std::memcpy(block, &cls, sizeof cls);
    return block + kHeader;
  }

  void put(void* p) {
    uint8_t* block = static_cast<uint8_t*>(p) - kHeader;
    int cls;
    std::memcpy(&cls, block, sizeof cls);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + (size_t(1) << cls) <= kCacheLimit) {
        free_[size_t(cls)].push_back(p);
        cached_ += size_t(1) << cls;
        return;
      }
    }
    std::free(block);
  }

 private:
  static int size_class(size_t bytes) {
    int cls = 6;  // 64 bytes at least
    while ((size_t(1) << cls) < bytes) cls++;
    return cls;
  }
  std::mutex mutex_;
  std::vector<void*> free_[64];
  size_t cached_ = 0;
};

BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();  // never destroyed: buffers may outlive static destruction
  return *cache;
}

void cached_free(void* p) { block_cache().put(p); }

}  // namespace

Buffer CpuBackend::alloc(size_t bytes) {
  if (bytes > (size_t(1) << 46)) fail("cannot allocate ", bytes, " bytes of activations");
  void* p = block_cache().get(std::max<size_t>(bytes, 1));
  if (!p) fail("out of memory allocating ", bytes, " bytes of activations");
  return Buffer(p, bytes, cached_free);
}

std::shared_ptr<void> CpuBackend::huge_page_memory(size_t bytes) const {
  constexpr size_t kKeepFree = size_t(2) << 30;
  if (!huge_pages_ || bytes < kHugePageMinBytes || !huge_pages_available()) return nullptr;
  const uint64_t available = available_memory_bytes();
  if (available != 0 && available < bytes + kKeepFree) return nullptr;
  return alloc_huge_pages(bytes);
}

Weight CpuBackend::prepare(const Weight& w) {
  // With huge pages, converted weights of 2 MiB and more (the load's own
  // memory, in 4 KiB pages) are copied into huge pages: streamed rows then
  // rarely miss the TLB (the decode GEMV reads 27 GB/s instead of 19.5, 2
  // threads, Intel machine of 2026-12-03). Weights read in place from the
  // mapped files get 2 MiB pages from the page cache (TensorStore::map_huge_pages),
  // or, where the files could not be mapped so, are copied too.
  const size_t bytes = w.bytes();
  if (!w.owned && !copies_of_mapped_) return w;
  std::shared_ptr<void> copy = huge_page_memory(bytes);
  if (!copy) return w;
  constexpr size_t kChunk = size_t(2) << 20;
  const int64_t chunks = int64_t((bytes + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t c = 0; c < chunks; c++) {
    const size_t at = size_t(c) * kChunk;
    std::memcpy(static_cast<uint8_t*>(copy.get()) + at, static_cast<const uint8_t*>(w.data) + at,
                std::min(kChunk, bytes - at));
  }
  Weight out = w;
  out.data = copy.get();
  out.owned = std::move(copy);
  return out;
}

void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  // Large copies (a prefill's keys and values into the cache) by every
  // thread: one core's copy falls well short of the memory's bandwidth.
  constexpr size_t kSplitBytes = size_t(1) << 20;
  const uintptr_t s_at = reinterpret_cast<uintptr_t>(src), d_at = reinterpret_cast<uintptr_t>(dst);
  if (bytes < kSplitBytes || threads_ < 2 || (d_at < s_at + bytes && s_at < d_at + bytes)) {  // (overlapping: memmove)
    if (bytes) std::memmove(dst, src, bytes);
    return;
  }
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  const size_t piece = ((bytes + size_t(threads_) - 1) / size_t(threads_) + 63) / 64 * 64;  // threads_ pieces cover it
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int t = 0; t < threads_; t++) {
    const size_t from = std::min(bytes, size_t(t) * piece), to = std::min(bytes, from + piece);
    std::memcpy(d + from, s + from, to - from);
  }
}

void CpuBackend::embed(const Weight& table, const int32_t* ids, int64_t T, float* x) {
  const int64_t d = table.cols;
  for (int64_t t = 0; t < T; t++) table.rows_to_f32(ids[t], 1, x + t * d);
}

void CpuBackend::dot_rows(const Weight& w, int64_t row0, int64_t nrows, const float* x, float* y) const {
  const RowKernels* rk = k_.rows(w.dtype);
  const float* xs[1] = {x};
  for (int64_t r = 0; r < nrows; r++) {
    if (rk) rk->dot_multi(w.row(row0 + r), xs, 1, w.cols, y + r, 1);
    else k_.f32.dot_multi(row_f32(w, row0 + r, thread_scratch(5, size_t(w.cols))), xs, 1, w.cols, y + r, 1);
  }
}

void CpuBackend::axpy_rows(const Weight& w, int64_t row0, int64_t nrows, const float* coef, float* out, int64_t c0,
                           int64_t c1) const {
  if (w.dtype == DType::Q8_0) {
    // Q8_0 rows are read in place, block by block (out is indexed from column 0).
    for (int64_t r = 0; r < nrows; r++)
      if (coef[r] != 0.0f) k_.q8_0.axpy(w.row(row0 + r), coef[r], out, c0, c1);
    return;
  }
  const RowKernels* rk = k_.rows(w.dtype);
  const size_t esize = rk ? dtype_size(w.dtype) : 4;
  for (int64_t r = 0; r < nrows; r++) {
    if (coef[r] == 0.0f) continue;
    const uint8_t* row = rk ? w.row(row0 + r)
                            : reinterpret_cast<const uint8_t*>(row_f32(w, row0 + r, thread_scratch(5, size_t(w.cols))));
    (rk ? rk : &k_.f32)->axpy(row + size_t(c0) * esize, coef[r], out + c0, c1 - c0);
  }
}

// Blocks of 64 weight rows per run a thread takes when it finishes one: up
// to 8 (512 rows, a long stream), about two runs per thread (a 2048-row
// matrix in 4 runs of 8). Equal static halves finished up to a fifth apart
// in decode, a different thread late each call (1.4B bf16 decode +4 % with
// runs); each run starts its stream cold, which q8_0's short rows pay most
// (1.4B q8_0 decode +4 % against runs of up to 4 blocks, 4 per thread; bf16
// even).
int64_t CpuBackend::block_run(int64_t blocks) const {
  return std::clamp<int64_t>(blocks / (2 * int64_t(threads_)), 1, 8);
}

bool CpuBackend::rounds_inputs(const Weight& w) const {
  return w.dtype == DType::BF16 && products(w) == GemmCompute::BF16;
}

void round_to_bf16(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; i++) y[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

const BlockQ8Act* CpuBackend::quantize_activations(const float* x, int64_t T, int64_t K, int slot) const {
  static thread_local std::vector<BlockQ8Act> buffers[2];
  std::vector<BlockQ8Act>& q = buffers[slot];
  const int64_t nb = K / kQ8Block;
  if (q.size() < size_t(T * nb)) q.resize(size_t(T * nb));
  BlockQ8Act* out = q.data();
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * K > (1 << 16))
  for (int64_t t = 0; t < T; t++) k_.q8_0.quantize(x + t * K, out + t * nb, K);
  return out;
}

const Q8Token* CpuBackend::prepare_token(const BlockQ8Act* xq, int64_t nb, int slot) const {
  static thread_local Q8Token tokens[2];
  if (!k_.q8_0.prepare_token || !k_.q8_0.prepare_token(xq, nb, &tokens[slot])) return nullptr;
  return &tokens[slot];
}

void CpuBackend::linear(const Weight& w, const float* x, int64_t T, float* y, const Weight* bias, bool exact) {
  const int64_t N = w.rows, K = w.cols;
  if (w.dtype == DType::Q8_0 && !exact) {
    // int8 products for every batch size: the activations quantized to
    // blocks of 32 once, then integer dot products (docs/quantization.md).
    const BlockQ8Act* xq = quantize_activations(x, T, K, 0);
    if (T > kSmallBatch && amx::usable()) {
      // Many tokens (prefill) on the int8 tiles: the tokens packed once,
      // then each thread's 16-row blocks in turn, the next block's rows
      // prefetched (docs/quantization.md).
      const int64_t nb = K / kQ8Block, blocks = (N + 15) / 16;
      static thread_local std::vector<uint8_t> packed_tokens;  // the calling thread's
      packed_tokens.resize(size_t(amx::q8_tokens_bytes(T, nb)));
      amx::pack_q8_tokens(xq, T, nb, packed_tokens.data());
      const uint8_t* packed = packed_tokens.data();
#pragma omp parallel num_threads(threads_)
      {
        float* scratch = thread_scratch(5, size_t(amx::q8_tile_scratch_floats(nb)));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
          const int64_t n0 = b * 16;
          const void* next = n0 + 32 <= N ? w.row(n0 + 16) : nullptr;
          amx::q8_dot_rows_tile(w.row(n0), w.row_bytes(), std::min<int64_t>(16, N - n0), packed, T, nb, y + n0, N,
                                next, scratch);
        }
      }
      add_bias(bias, T, N, y);
      return;
    }
    // Up to kSmallBatch tokens, or no AMX: each thread takes blocks of 64
    // weight rows and applies them to the tokens kSmallBatch at a time, the
    // rows staying in L2 between groups (the same sums for any batch size).
    // Runs of blocks go to threads as they finish (block_run).
    const int64_t nb = K / kQ8Block, blocks = (N + 63) / 64, run = block_run(blocks);
    const Q8Token* token = T == 1 ? prepare_token(xq, nb, 0) : nullptr;
#pragma omp parallel for schedule(dynamic, run) num_threads(threads_)
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t n0 = b * 64;
      if (token) {
        k_.q8_0.dot_rows_token(w.row(n0), w.row_bytes(), std::min<int64_t>(64, N - n0), *token, y + n0, nullptr);
        continue;
      }
      for (int64_t t0 = 0; t0 < T; t0 += kSmallBatch) {
        const int64_t nt = std::min<int64_t>(kSmallBatch, T - t0);
        const BlockQ8Act* xqs[kSmallBatch];
        for (int64_t t = 0; t < nt; t++) xqs[t] = xq + (t0 + t) * nb;
        k_.q8_0.dot_rows(w.row(n0), w.row_bytes(), std::min<int64_t>(64, N - n0), xqs, nt, K, y + t0 * N + n0, N);
      }
    }
  } else if (T <= kSmallBatch) {
    // Streaming: every weight row is read once and applied to all T rows.
    if (!exact && rounds_inputs(w)) {
      // The GEMM's bf16 products, so that a batch's size does not decide how
      // its inputs are rounded (bf16 x bf16 is exact in float32).
      float* rounded = thread_scratch(7, size_t(T * K));
      round_to_bf16(x, T * K, rounded);
      x = rounded;
    }
    const float* xs[kSmallBatch];
    for (int64_t t = 0; t < T; t++) xs[t] = x + t * K;
    const RowKernels* rk = k_.rows(w.dtype);
    if (rk) {
      // Blocks of 64 rows: each thread streams a run of consecutive blocks,
      // then takes the next run (block_run).
      const int64_t blocks = (N + 63) / 64, run = block_run(blocks);
#pragma omp parallel for schedule(dynamic, run) num_threads(threads_)
      for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * 64;
        rk->dot_rows(w.row(n0), w.row_bytes(), std::min<int64_t>(64, N - n0), xs, T, K, y + n0, N);
      }
    } else {
#pragma omp parallel for schedule(static) num_threads(threads_)
      for (int64_t n = 0; n < N; n++)
        k_.f32.dot_multi(row_f32(w, n, thread_scratch(5, size_t(K))), xs, T, K, y + n, N);
    }
  } else {
    // Exact products split the inputs where gemm can (bf16 weights on AMX,
    // GemmCompute::F32Split) unless --compute f32 asks for OpenBLAS throughout.
    const GemmCompute exact_products = compute_ == Compute::F32 ? GemmCompute::F32 : GemmCompute::F32Split;
    gemm(k_, threads_, exact ? exact_products : products(w), x, K, T, w, /*transposed=*/true, y, N,
         /*accumulate=*/false);
  }
  add_bias(bias, T, N, y);
}

void CpuBackend::add_bias(const Weight* bias, int64_t T, int64_t N, float* y) {
  if (!bias) return;
  const float* b = static_cast<const float*>(bias->data);
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * N > (1 << 16))
  for (int64_t t = 0; t < T; t++)
    for (int64_t n = 0; n < N; n++) y[t * N + n] += b[n];
}

void CpuBackend::matmul_nn(const float* x, int64_t T, const Weight& w, float* y, bool accumulate) {
  gemm(k_, threads_, products(w), x, w.rows, T, w, /*transposed=*/false, y, w.cols, accumulate);
}

GemmCompute CpuBackend::products(const Weight& w) const {
  if (compute_ == Compute::Auto) return w.dtype == DType::BF16 && bf16_products_native() ? GemmCompute::BF16 : GemmCompute::F32;
  return compute_ == Compute::BF16 ? GemmCompute::BF16 : GemmCompute::F32;
}

void CpuBackend::rmsnorm(const float* x, const Weight& w, int64_t T, int64_t d, double eps, float* y) {
  const float* wv = static_cast<const float*>(w.data);
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * d > (1 << 15))
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; i++) ss += xt[i] * xt[i];
    const float inv = 1.0f / std::sqrt(ss / float(d) + float(eps));
    for (int64_t i = 0; i < d; i++) y[t * d + i] = wv[i] * (xt[i] * inv);
  }
}

void CpuBackend::layernorm(const float* x, const Weight& w, const Weight& b, int64_t T, int64_t d, double eps,
                           float* y) {
  const float* wv = static_cast<const float*>(w.data);
  const float* bv = static_cast<const float*>(b.data);
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * d > (1 << 15))
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * d;
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < d; i++) sum += xt[i];
    const double mean = sum / double(d);
    for (int64_t i = 0; i < d; i++) sq += (xt[i] - mean) * (xt[i] - mean);
    const float inv = float(1.0 / std::sqrt(sq / double(d) + eps));
    for (int64_t i = 0; i < d; i++) y[t * d + i] = (xt[i] - float(mean)) * inv * wv[i] + bv[i];
  }
}

void CpuBackend::add(float* x, const float* y, int64_t n) {
#pragma omp parallel for simd schedule(static) num_threads(threads_) if (n > (1 << 16))
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void CpuBackend::activation(Activation a, float* x, int64_t n) {
  // One loop per kind, so that each vectorises.
  switch (a) {
    case Activation::Relu2:
#pragma omp parallel for simd schedule(static) num_threads(threads_) if (n > (1 << 16))
      for (int64_t i = 0; i < n; i++) {
        const float r = x[i] > 0.0f ? x[i] : 0.0f;
        x[i] = r * r;
      }
      break;
    case Activation::GeluQuick:
#pragma omp parallel for schedule(static) num_threads(threads_) if (n > (1 << 16))
      for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + std::exp(-1.702f * x[i]));
      break;
    case Activation::Gelu:
#pragma omp parallel for schedule(static) num_threads(threads_) if (n > (1 << 16))
      for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * float(M_SQRT1_2)));
      break;
  }
}

void CpuBackend::rope(float* x, int64_t T, int64_t heads, int64_t hd, const float* cos_t, const float* sin_t) {
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * heads * hd > (1 << 15))
  for (int64_t t = 0; t < T; t++) {
    const float* cosv = cos_t + t * half;
    const float* sinv = sin_t + t * half;
    for (int64_t h = 0; h < heads; h++) {
      float* v = x + (t * heads + h) * hd;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cosv[i] - b * sinv[i];
        v[i + half] = b * cosv[i] + a * sinv[i];
      }
    }
  }
}

void CpuBackend::attention(const float* q, const AttentionSeq* seqs, int64_t n_seqs, int64_t nh, int64_t nkv,
                           int64_t hd, bool causal, float* out, DType projections) {
  // Each task is (sequence, head, tile of queries). In float32 (kQ queries):
  // flash-style, the keys in blocks of kK with an online softmax (running
  // max m and sum l per query), so no score matrix larger than kQ x kK
  // exists. On the bf16 tiles (16 queries of a sequence of 16 or more): the
  // scores of every key the tile sees (a row of them stays in L1), their
  // softmax in float32, then the weights rounded to bf16 times the values.
  constexpr int64_t kQ = 32, kK = 128;
  const int64_t group = nh / nkv, kv_stride = nkv * hd, q_stride = nh * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  // As linear's products for the projections' weights (amx.h: hd 64 or 128).
  const bool tiles = (compute_ == Compute::BF16 || (compute_ == Compute::Auto && projections == DType::BF16)) &&
                     (hd == 64 || hd == 128) && amx::usable();
  constexpr int64_t kTile = amx::kTileRows;
  struct Task {
    int64_t seq, head, q0, nq;
    bool tile;
  };
  // The tiles' keys and values, bf16, per (sequence, kv head): keys in
  // blocks of 16, values in steps of 32 (amx.h), zeros past the last key.
  const int64_t key_block_words = hd / 2 * kTile, value_step_words = kTile * hd;
  std::vector<size_t> packed_at(size_t(n_seqs) + 1, 0);
  auto key_blocks = [&](int64_t s) { return (seqs[s].pos0 + seqs[s].n + 31) / 32 * 2; };  // (whole value steps)
  for (int64_t s = 0; s < n_seqs; s++) {
    const bool on_tiles = tiles && seqs[s].n >= kTile;
    packed_at[size_t(s) + 1] =
        packed_at[size_t(s)] + (on_tiles ? size_t(nkv * key_blocks(s) * (key_block_words + value_step_words / 2)) : 0);
  }
  static thread_local std::vector<uint32_t> packed_memory;  // the calling thread's (a name in the
  packed_memory.resize(packed_at.back());                   // parallel loops is each thread's own)
  uint32_t* const packed = packed_memory.data();
  auto packed_keys = [&](int64_t s, int64_t kvh) {
    return packed + packed_at[size_t(s)] + size_t(kvh * key_blocks(s) * key_block_words);
  };
  auto packed_values = [&](int64_t s, int64_t kvh) {
    return packed + packed_at[size_t(s)] + size_t(nkv * key_blocks(s) * key_block_words) +
           size_t(kvh * key_blocks(s) / 2 * value_step_words);
  };
  std::vector<std::pair<int64_t, int64_t>> to_pack;  // (sequence, kv head)
  for (int64_t s = 0; s < n_seqs; s++)
    if (packed_at[size_t(s) + 1] > packed_at[size_t(s)])
      for (int64_t kvh = 0; kvh < nkv; kvh++) to_pack.push_back({s, kvh});
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (to_pack.size() > 1)
  for (size_t i = 0; i < to_pack.size(); i++) {
    const int64_t s = to_pack[i].first, kvh = to_pack[i].second;  // (no structured bindings: lambdas below name them)
    const AttentionSeq& sq = seqs[s];
    const int64_t n_keys = sq.pos0 + sq.n;
    // 32 rows of bf16 (16 keys for pack_u, 32 values for pack_pairs), zero past the last key.
    uint16_t* rows = reinterpret_cast<uint16_t*>(thread_scratch(0, size_t(2 * kTile * hd / 2)));
    const uint16_t* row_ptrs[2 * kTile];
    for (int64_t r = 0; r < 2 * kTile; r++) row_ptrs[r] = rows + r * hd;
    auto to_bf16 = [&](const float* m, int64_t j0, int64_t count) {
      for (int64_t r = 0; r < count; r++) {
        uint16_t* dst = rows + r * hd;
        if (j0 + r < n_keys) k_.pack_bf16_pairs(m + (j0 + r) * kv_stride + kvh * hd, reinterpret_cast<uint32_t*>(dst), hd);
        else std::fill(dst, dst + hd, uint16_t(0));
      }
    };
    uint32_t* pk = packed_keys(s, kvh);
    for (int64_t b = 0; b < key_blocks(s); b++) {
      to_bf16(sq.k, b * kTile, kTile);
      amx::pack_u(rows, size_t(hd) * 2, kTile, hd, pk + b * key_block_words);
    }
    uint32_t* pv = packed_values(s, kvh);
    for (int64_t st = 0; st < key_blocks(s) / 2; st++) {
      to_bf16(sq.v, st * 2 * kTile, 2 * kTile);
      amx::pack_pairs(row_ptrs, 2 * kTile, hd, pv + st * value_step_words);
    }
  }
  // OpenBLAS (OpenMP build) runs single-threaded inside an active team; a
  // one-thread team is inactive, so tell it so, or it starts threads of its own.
  ScopedThreads blas_single(1);
  std::vector<Task> tasks;
  for (int64_t s = 0; s < n_seqs; s++) {
    const bool on_tiles = packed_at[size_t(s) + 1] > packed_at[size_t(s)];
    const int64_t step = on_tiles ? kTile : kQ;
    for (int64_t h = 0; h < nh; h++)
      for (int64_t q0 = 0; q0 < seqs[s].n; q0 += step)
        tasks.push_back({s, h, q0, std::min(step, seqs[s].n - q0), on_tiles});
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
  for (size_t ti = 0; ti < tasks.size(); ti++) {
    const Task& task = tasks[ti];
    const AttentionSeq& sq = seqs[task.seq];
    if (task.tile) {
      const int64_t nq = task.nq, kvh = task.head / group, first_pos = sq.pos0 + task.q0;
      const int64_t kv_used = causal ? first_pos + nq : sq.pos0 + sq.n;
      const int64_t ld = (kv_used + 31) / 32 * 32;  // scores and weights per query row
      float* S = thread_scratch(0, size_t(kTile * ld));
      float* O = thread_scratch(1, size_t(kTile * hd));
      uint16_t* qb = reinterpret_cast<uint16_t*>(thread_scratch(2, size_t(kTile * hd / 2)));
      uint16_t* P = reinterpret_cast<uint16_t*>(thread_scratch(3, size_t(kTile * ld / 2)));
      float* l = thread_scratch(4, size_t(kTile));
      for (int64_t r = 0; r < kTile; r++) {
        uint16_t* dst = qb + r * hd;
        if (r < nq) k_.pack_bf16_pairs(q + (sq.row0 + task.q0 + r) * q_stride + task.head * hd, reinterpret_cast<uint32_t*>(dst), hd);
        else std::fill(dst, dst + hd, uint16_t(0));
      }
      amx::attention_scores(qb, hd, packed_keys(task.seq, kvh), (kv_used + kTile - 1) / kTile, S, ld);
      for (int64_t r = 0; r < kTile; r++) {
        uint32_t* p_row = reinterpret_cast<uint32_t*>(P + r * ld);
        if (r >= nq) {
          std::fill(p_row, p_row + ld / 2, 0u);
          continue;
        }
        float* row = S + r * ld;
        const int64_t visible = causal ? first_pos + r + 1 : kv_used;
        k_.scale(scale, row, visible);
        l[r] = k_.exp_shifted_sum(row, visible, max_value(row, visible));
        std::fill(row + visible, row + ld, 0.0f);
        k_.pack_bf16_pairs(row, p_row, ld);
      }
      amx::attention_values(P, ld, ld / 32, packed_values(task.seq, kvh), hd, O);
      for (int64_t r = 0; r < nq; r++) {
        const float inv = 1.0f / l[r];
        float* o = out + (sq.row0 + task.q0 + r) * q_stride + task.head * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = O[r * hd + i] * inv;
      }
      continue;
    }
    const int64_t nq = task.nq, kvh = task.head / group;
    const float* Q = q + (sq.row0 + task.q0) * q_stride + task.head * hd;  // [nq, hd], row stride q_stride
    const float* Kh = sq.k + kvh * hd;                                       // [P, hd], row stride kv_stride
    const float* Vh = sq.v + kvh * hd;
    float* S = thread_scratch(0, size_t(kQ * kK));
    float* O = thread_scratch(1, size_t(kQ * hd));
    float* m = thread_scratch(2, size_t(kQ));
    float* l = thread_scratch(3, size_t(kQ));
    std::fill(O, O + nq * hd, 0.0f);
    std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
    std::fill(l, l + nq, 0.0f);
    const int64_t first_pos = sq.pos0 + task.q0;  // position of the tile's first query
    const int64_t kv_end = causal ? first_pos + nq : sq.pos0 + sq.n;
    for (int64_t k0 = 0; k0 < kv_end; k0 += kK) {
      const int64_t nk = std::min(kK, kv_end - k0);
      // S[nq, nk] = Q . K[k0:k0+nk]^T * scale
      if (nq >= 4) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nq), int(nk), int(hd), scale, Q, int(q_stride),
                    Kh + k0 * kv_stride, int(kv_stride), 0.0f, S, int(kK));
      } else {
        for (int64_t r = 0; r < nq; r++)
          for (int64_t j = 0; j < nk; j++) S[r * kK + j] = scale * k_.dot(Q + r * q_stride, Kh + (k0 + j) * kv_stride, hd);
      }
      // Online softmax over the keys each query may see in this block.
      for (int64_t r = 0; r < nq; r++) {
        float* row = S + r * kK;
        const int64_t visible = causal ? std::clamp<int64_t>(first_pos + r + 1 - k0, 0, nk) : nk;
        const float block_max = max_value(row, visible);
        const float m_new = std::max(m[r], block_max);
        const float correction = visible == 0 || m[r] == m_new ? 1.0f : std::exp(m[r] - m_new);
        const float sum = visible > 0 ? k_.exp_shifted_sum(row, visible, m_new) : 0.0f;
        std::fill(row + visible, row + nk, 0.0f);
        if (visible > 0) m[r] = m_new;
        l[r] = l[r] * correction + sum;
        if (correction != 1.0f) k_.scale(correction, O + r * hd, hd);
      }
      // O[nq, hd] += P[nq, nk] . V[k0:k0+nk]
      if (nq >= 4) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nq), int(hd), int(nk), 1.0f, S, int(kK),
                    Vh + k0 * kv_stride, int(kv_stride), 1.0f, O, int(hd));
      } else {
        for (int64_t r = 0; r < nq; r++)
          for (int64_t j = 0; j < nk; j++)
            if (S[r * kK + j] != 0.0f) k_.axpy(S[r * kK + j], Vh + (k0 + j) * kv_stride, O + r * hd, hd);
      }
    }
    for (int64_t r = 0; r < nq; r++) {
      const float inv = 1.0f / l[r];
      float* o = out + (sq.row0 + task.q0 + r) * q_stride + task.head * hd;
      for (int64_t i = 0; i < hd; i++) o[i] = O[r * hd + i] * inv;
    }
  }
}

void CpuBackend::router_select(const float* z, const Weight& mean, const Weight& var, int64_t T, int64_t H,
                               int64_t E, double sigma, float* g) {
  const float* mu = static_cast<const float*>(mean.data);
  const float* va = static_cast<const float*>(var.data);
#pragma omp parallel for schedule(static) num_threads(threads_) if (T * H * E > (1 << 14))
  for (int64_t th = 0; th < T * H; th++) {
    const int64_t h = th % H;
    const float inv_std = 1.0f / std::sqrt(va[h] + 1e-5f);  // BatchNorm1d eps
    router_select_row<float, float>(z + th * E, E, mu[h], inv_std, float(sigma), g + th * E);
  }
}

CpuBackend::RouterAids& CpuBackend::router_aids(const Weight& w) {
  const size_t bytes = w.bytes(), edge = std::min(kEdgeBytes, bytes);
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  std::vector<uint8_t> edges(data, data + edge);
  edges.insert(edges.end(), data + bytes - edge, data + bytes);
  RouterAids& entry = router_aids_[w.data];
  if (entry.rows != w.rows || entry.cols != w.cols || entry.edges != edges) {
    entry = RouterAids{};
    entry.rows = w.rows;
    entry.cols = w.cols;
    entry.edges = std::move(edges);
  }
  return entry;
}

std::shared_ptr<const std::vector<float>> CpuBackend::row_norms(const Weight& w) {
  std::lock_guard<std::mutex> lock(router_aids_mutex_);
  RouterAids& entry = router_aids(w);
  if (!entry.norms) {
    auto norms = std::make_shared<std::vector<float>>(size_t(w.rows));
    std::vector<float> row(size_t(w.cols));
    for (int64_t r = 0; r < w.rows; r++) {
      w.rows_to_f32(r, 1, row.data());
      double ss = 0;
      for (float v : row) ss += double(v) * v;
      (*norms)[size_t(r)] = float(std::sqrt(ss) * (1 + 1e-6));  // rounded up
    }
    entry.norms = std::move(norms);
  }
  return entry.norms;
}

std::shared_ptr<const CpuBackend::Int8Copy> CpuBackend::int8_copy(const Weight& w) {
  std::lock_guard<std::mutex> lock(router_aids_mutex_);
  RouterAids& entry = router_aids(w);
  if (!entry.int8) {
    const int64_t N = w.rows, K = w.cols;
    const DTypeTraits& q8 = dtype_traits(DType::Q8_0);
    auto copy = std::make_shared<Int8Copy>();
    const size_t row_bytes = dtype_row_bytes(DType::Q8_0, K);
    // Read whole by every decode step: in huge pages as the weights are (prepare).
    std::shared_ptr<void> memory = huge_page_memory(size_t(N) * row_bytes);
    if (!memory) memory = std::shared_ptr<uint8_t[]>(new uint8_t[size_t(N) * row_bytes]);
    uint8_t* blocks = static_cast<uint8_t*>(memory.get());
    copy->q8 = Weight::view(DType::Q8_0, N, K, blocks);
    copy->q8.owned = std::move(memory);
    copy->err_norms.resize(size_t(N));
#pragma omp parallel num_threads(threads_)
    {
      std::vector<float> row(static_cast<size_t>(K)), back(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t r = 0; r < N; r++) {
        w.rows_to_f32(r, 1, row.data());
        q8.from_f32(row.data(), blocks + size_t(r) * row_bytes, K);
        q8.to_f32(blocks + size_t(r) * row_bytes, back.data(), K);
        double ss = 0;
        for (int64_t k = 0; k < K; k++) {
          const double diff = double(row[size_t(k)]) - back[size_t(k)];
          ss += diff * diff;
        }
        copy->err_norms[size_t(r)] = float(std::sqrt(ss) * (1 + 1e-6));  // rounded up
      }
    }
    entry.int8 = std::move(copy);
  }
  return entry.int8;
}

namespace {

// One head's approximate logits z[E], whose error is at most margin(e) (raw
// logit units), against the selection router_select_row makes from the
// float32 logits of the decode: a logit whose upper bound is under the
// lowest possible threshold drops out; the others may be kept and must be
// the decode's float32 dot products: their indices go to need, in order (the
// count is returned). The threshold min(max_e n_e, sigma) is at least
// min(max_e low_e, sigma), so every logit the decode keeps, and its largest
// one, is among those marked.
template <class Margin>
int64_t bound_row(const float* z, int64_t E, float mu, float inv_std, float sigma, Margin margin, int32_t* need) {
  // n_e +- margin_e in BatchNorm units (the margin with slack for the
  // float32 arithmetic of the comparisons), in loops the compiler vectorizes.
  float* low = thread_scratch(4, size_t(2 * E));
  float* high = low + E;
  for (int64_t e = 0; e < E; e++) {
    const float n = (z[e] - mu) * inv_std, m = margin(e) * inv_std + 1e-5f * (1.0f + std::fabs(n));
    low[e] = n - m;
    high[e] = n + m;
  }
  const float lowest_cut = std::min(max_value(low, E), sigma);
  int64_t count = 0;
  for (int64_t e = 0; e < E; e++)
    if (high[e] >= lowest_cut) need[count++] = int32_t(e);
  return count;
}

// fn(t, h, mean_h, 1 / std_h) for every (token, head) row of a router, in parallel
template <class Fn>
void for_each_head_row(int threads, int64_t T, int64_t H, const Weight& mean, const Weight& var, Fn fn) {
  const float* mu = static_cast<const float*>(mean.data);
  const float* va = static_cast<const float*>(var.data);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t th = 0; th < T * H; th++) {
    const int64_t t = th / H, h = th % H;
    fn(t, h, mu[h], 1.0f / std::sqrt(va[h] + 1e-5f));  // BatchNorm1d eps
  }
}

// A bounded router's selection g [T, H*E] from T tokens' approximate logits
// z [T, H*E]: bound_row per (token, head) row (margin(t, n): the error bound
// of logit n of token t), then the logits it marks recomputed as the
// decode's float32 dot products (one token's row kernel), weight row by
// weight row, so that a row is read once for all the tokens of a block that
// need it, then router_select_row's selection from the marked logits alone
// (the others would be -inf: the same g bit for bit, without a pass over
// every logit). g holds the marks until then.
template <class Margin>
void select_bounded(int threads, const RowKernels& rk, const Weight& w, const float* x, int64_t T,
                      const Weight& mean, const Weight& var, int64_t H, int64_t E, float sigma, Margin margin,
                      float* z, float* g) {
  const int64_t N = H * E, K = w.cols;
  int32_t* by_row = reinterpret_cast<int32_t*>(g);  // [T*H, E]: each row's marked indices from its start
  struct Marks {
    std::vector<int64_t> count, start, fill;  // per (token, head) row; per slot (below) + 1; fill
    std::vector<int32_t> tokens;              // the tokens of the marks, slot by slot
  };
  static thread_local Marks marks;  // kept with its capacity; taken by reference in the calling
  Marks& mk = marks;                 // thread (named in a parallel loop, it is each thread's own)
  mk.count.resize(size_t(T * H));
  for_each_head_row(threads, T, H, mean, var, [&](int64_t t, int64_t h, float mu, float inv_std) {
    mk.count[size_t(t * H + h)] = bound_row(z + t * N + h * E, E, mu, inv_std, sigma,
                                            [&](int64_t e) { return margin(t, h * E + e); }, by_row + (t * H + h) * E);
  });
  // Counting sort of the marks by slot (block of kTokens tokens, weight row):
  // a block's inputs stay in L2 while its rows are read (1.4B, 512 tokens:
  // the dot products took 8.5 ms per router with every row read once for
  // all tokens, their inputs from L3; 4.2 ms by blocks).
  constexpr int64_t kTokens = 128;
  const int64_t slots = (T + kTokens - 1) / kTokens * N;
  // fn(t, token t's slots for head h, the row's marks, their count) per
  // (token, head) row, in order: no divisions per mark (the sort of a 1.4B
  // router of 512 tokens 1.7 -> 1.1 ms).
  auto for_each_row = [&](auto fn) {
    for (int64_t t = 0; t < T; t++)
      for (int64_t h = 0; h < H; h++) {
        const int64_t th = t * H + h;
        fn(t, mk.start.data() + t / kTokens * N + h * E, by_row + th * E, mk.count[size_t(th)]);
      }
  };
  mk.start.assign(size_t(slots + 1), 0);
  for_each_row([&](int64_t, int64_t* slot_row, const int32_t* marked, int64_t count) {
    for (int64_t i = 0; i < count; i++) slot_row[marked[i] + 1]++;
  });
  for (int64_t j = 0; j < slots; j++) mk.start[size_t(j + 1)] += mk.start[size_t(j)];
  mk.fill.assign(mk.start.begin(), mk.start.end() - 1);
  mk.tokens.resize(size_t(mk.start[size_t(slots)]));
  for_each_row([&](int64_t t, int64_t* slot_row, const int32_t* marked, int64_t count) {
    int64_t* fill_row = mk.fill.data() + (slot_row - mk.start.data());
    for (int64_t i = 0; i < count; i++) mk.tokens[size_t(fill_row[marked[i]]++)] = int32_t(t);
  });
#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
  for (int64_t j = 0; j < slots; j++)
    for (int64_t i = mk.start[size_t(j)]; i < mk.start[size_t(j + 1)]; i++) {
      const int64_t t = mk.tokens[size_t(i)], n = j % N;
      const float* xt = x + t * K;
      rk.dot_rows(w.row(n), w.row_bytes(), 1, &xt, 1, K, z + t * N + n, 1);
    }
  // The selection from the marked logits (router_select's own threshold
  // for its threads: a decode step's few rows in the calling thread).
  const int select_threads = T * H * E > (1 << 14) ? threads : 1;
  for_each_head_row(select_threads, T, H, mean, var, [&](int64_t t, int64_t h, float mu, float inv_std) {
    const int64_t th = t * H + h, count = mk.count[size_t(th)];
    int32_t* marked = reinterpret_cast<int32_t*>(thread_scratch(4, size_t(E)));
    std::copy(by_row + th * E, by_row + th * E + count, marked);  // (g's row is overwritten)
    router_select_marked<float, float>(z + t * N + h * E, marked, count, E, mu, inv_std, sigma, g + t * N + h * E);
  });
}

}  // namespace

void CpuBackend::router(const Weight& w, const float* x, int64_t T, const Weight& mean, const Weight& var, int64_t H,
                        int64_t E, double sigma, float* z, float* g) {
  const RowKernels* rk = k_.rows(w.dtype);
  // The bounds' passes cost per logit and per input; the product they save
  // costs per logit times K: below K = 1536 the exact product is as fast or
  // faster (monet_gemm_bench --routers, exact / bounded time, 512 tokens:
  // K 256, E 64 0.69x; K 1024, E 64 0.92x). Over more tokens the kept
  // logits' dot products cost per kept logit: with few experts per head
  // (a larger share kept) they cost more than the product they save
  // (K 1536, E 64 0.59-0.64x; K 2048, E 128 1.02-1.05x, E 256 1.27-1.52x,
  // E 512 1.54-1.84x; K 1536, E 512 1.66-1.68x).
  constexpr int64_t kBoundedRouterMinK = 1536, kBoundedRouterMinExperts = 128;
  if (w.dtype != DType::BF16 || !rk || w.cols < kBoundedRouterMinK) {
    Backend::router(w, x, T, mean, var, H, E, sigma, z, g);
    return;
  }
  if (T <= kSmallBatch) {  // (int8 blocks need whole blocks of inputs)
    if (w.cols % kQ8Block == 0) router_int8_bounded(w, x, T, mean, var, H, E, sigma, z, g);
    else Backend::router(w, x, T, mean, var, H, E, sigma, z, g);
    return;
  }
  if (compute_ == Compute::F32 || !bf16_products_native() || E < kBoundedRouterMinExperts) {
    Backend::router(w, x, T, mean, var, H, E, sigma, z, g);
    return;
  }
  // One bf16 product (the inputs rounded to the nearest bf16, as under
  // GemmCompute::BF16), then the float32 dot products of the decode for
  // every logit that may be kept. A logit of the product differs from the
  // real x . w_e by at most |(x - x^) . w_e| + |float32 sums' error|
  // <= c_t ||w_e||, where c_t = (2^-8 + K 2^-21) ||x|| (Cauchy-Schwarz;
  // |x - x^| <= 2^-8 |x| for each input in float32's normal range, as
  // activations after RMSNorm are; K 2^-23 bounds float32 sums of K terms,
  // counted for the product's sums and the float32 dot product's, and
  // doubled for slack).
  // In BatchNorm units n_e +- margin_e: a logit whose upper bound is under
  // the lowest possible threshold is dropped; the others (14 of 512 per
  // head in a 1.4B prefill: the kept ones and the threshold's neighbours)
  // are the decode's float32 dot products, so the selection and the
  // probabilities are those the decode makes from the same inputs x, bit
  // for bit.
  const int64_t K = w.cols;
  gemm(k_, threads_, GemmCompute::BF16, x, K, T, w, /*transposed=*/true, z, w.rows, /*accumulate=*/false);
  const std::shared_ptr<const std::vector<float>> wn = row_norms(w);
  // (x . x in float32: its error, under K 2^-24 relative, is inside the 1.01.)
  float* c = thread_scratch(3, size_t(T));
  const double c_per_norm = (std::ldexp(1.0, -8) + double(K) * std::ldexp(1.0, -21)) * 1.01;
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t t = 0; t < T; t++) c[t] = float(c_per_norm * std::sqrt(double(k_.dot(x + t * K, x + t * K, K))));
  const float* norms = wn->data();
  select_bounded(threads_, *rk, w, x, T, mean, var, H, E, float(sigma),
                 [&](int64_t t, int64_t n) { return c[t] * norms[n]; }, z, g);
}

void CpuBackend::router_int8_bounded(const Weight& w, const float* x, int64_t T, const Weight& mean,
                                     const Weight& var, int64_t H, int64_t E, double sigma, float* z, float* g) {
  // A few tokens (decode) read every router row: int8 products (linear's
  // Q8_0 path over an int8 copy of the weight, half the bytes) bound every
  // logit, and the float32 dot product of the decode computes the few that
  // may be kept (the kept ones too: their probabilities are then the
  // decode's exactly). With x^ and w^_e the int8 values the products take,
  // |x^ . w^_e - x . w_e| <= ||x - x^|| ||w_e|| + ||x^|| ||w_e - w^_e||
  // (Cauchy-Schwarz), and K 2^-21 (||x|| + ||x - x^||)(||w_e|| + ||w_e - w^_e||)
  // bounds both float32 sums (the products' and the dot product's, whose
  // errors are under K 2^-24 times those norms each).
  const int64_t K = w.cols;
  const RowKernels* rk = k_.rows(w.dtype);
  const std::shared_ptr<const std::vector<float>> wn = row_norms(w);
  const std::shared_ptr<const Int8Copy> copy = int8_copy(w);
  linear(copy->q8, x, T, z, nullptr);
  // per token: ||x - x^||, ||x^||, K 2^-21 (||x|| + ||x - x^||), each rounded up
  const BlockQ8Act* xq = quantize_activations(x, T, K, 0);  // the blocks linear's products took
  float* c = thread_scratch(3, size_t(3 * T));
  for (int64_t t = 0; t < T; t++) {
    double err = 0, norm_q = 0, norm = 0;
    for (int64_t k = 0; k < K; k++) {
      const BlockQ8Act& b = xq[t * (K / kQ8Block) + k / kQ8Block];
      const double v = double(x[t * K + k]), q = double(b.d) * b.q[k % kQ8Block];
      err += (v - q) * (v - q);
      norm_q += q * q;
      norm += v * v;
    }
    c[3 * t] = float(std::sqrt(err) * 1.01);
    c[3 * t + 1] = float(std::sqrt(norm_q) * 1.01);
    c[3 * t + 2] = float(double(K) * std::ldexp(1.0, -21) * (std::sqrt(norm) + std::sqrt(err)) * 1.01);
  }
  const float* norms = wn->data();
  const float* errs = copy->err_norms.data();
  select_bounded(threads_, *rk, w, x, T, mean, var, H, E, float(sigma),
                 [&](int64_t t, int64_t n) {
                   return c[3 * t] * norms[n] + c[3 * t + 1] * errs[n] + c[3 * t + 2] * (norms[n] + errs[n]);
                 },
                 z, g);
}

void CpuBackend::argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) {
  for (int64_t r = 0; r < rows; r++) {
    const float* row = x + r * n;
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
      if (row[i] > row[best]) best = i;
    out[r] = int32_t(best);
  }
}

void CpuBackend::log_softmax_rows(const float* x, int64_t rows, int64_t n, float* y) {
#pragma omp parallel for schedule(static) num_threads(threads_) if (rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    const float lse = float(log_sum_exp(x + r * n, n));
    for (int64_t i = 0; i < n; i++) y[r * n + i] = x[r * n + i] - lse;
  }
}

}  // namespace monet::cpu

namespace monet {

std::unique_ptr<Backend> make_backend(const BackendOptions& opts) {
  if (opts.device != "cpu")
    fail("device \"", opts.device, "\": this build has only the cpu backend (docs/architecture.md says where a ",
         "device backend goes)");
  if (opts.threads < 0) fail("threads must be 0 (all cores) or more, got ", opts.threads);
  Compute compute = Compute::Auto;
  if (opts.compute == "f32") compute = Compute::F32;
  else if (opts.compute == "bf16") compute = Compute::BF16;
  else if (!opts.compute.empty() && opts.compute != "auto")
    fail("compute \"", opts.compute, "\": expected auto (bf16 products for bf16 weights where the CPU multiplies bf16), ",
         "f32 (exact float32 products) or bf16 (bf16 inputs, float32 sums)");
  const cpu::KernelSet& k = cpu::select_kernels(opts.cpu_kernels);
  return std::make_unique<cpu::CpuBackend>(opts.threads, k, compute, opts.huge_pages, opts.huge_page_copies_of_mapped);
}

}  // namespace monet
