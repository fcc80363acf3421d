// The CPU backend: OpenMP threads (a team of `threads` per op, set per
// backend, never process-wide), OpenBLAS single-threaded inside each team for
// large GEMM tiles, and the run-time selected row kernels of kernels.h.
#pragma once
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/gemm.h"
#include "backend/cpu/kernels.h"

namespace monet::cpu {

struct SideEntries;  // expert_mix.cpp

class CpuBackend final : public Backend {
 public:
  // huge_pages: prepare() may copy large converted weights into huge pages
  // (copies_of_mapped: weights read in place from the files too)
  CpuBackend(int threads, const KernelSet& kernels, Compute compute, bool huge_pages = false,
             bool copies_of_mapped = false);

  std::string name() const override;
  int threads() const override { return threads_; }
  const KernelSet& kernels() const { return k_; }

  Buffer alloc(size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void to_host(void* host_dst, const void* src, size_t bytes) override { copy(host_dst, src, bytes); }
  void from_host(void* dst, const void* host_src, size_t bytes) override { copy(dst, host_src, bytes); }
  // Large weights copied into huge pages where memory allows (cpu_backend.cpp).
  Weight prepare(const Weight& w) override;

  void embed(const Weight& table, const int32_t* ids, int64_t T, float* x) override;
  void linear(const Weight& w, const float* x, int64_t T, float* y, const Weight* bias = nullptr,
              bool exact = false) override;
  void rmsnorm(const float* x, const Weight& w, int64_t T, int64_t d, double eps, float* y) override;
  void layernorm(const float* x, const Weight& w, const Weight& b, int64_t T, int64_t d, double eps,
                 float* y) override;
  void add(float* x, const float* y, int64_t n) override;
  void activation(Activation a, float* x, int64_t n) override;
  void rope(float* x, int64_t T, int64_t heads, int64_t hd, const float* cos_t, const float* sin_t) override;
  void attention(const float* q, const AttentionSeq* seqs, int64_t n_seqs, int64_t nh, int64_t nkv, int64_t hd,
                 bool causal, float* out, DType projections = DType::F32) override;
  void router_select(const float* z, const Weight& mean, const Weight& var, int64_t T, int64_t H, int64_t E,
                     double sigma, float* g) override;
  void router(const Weight& w, const float* x, int64_t T, const Weight& mean, const Weight& var, int64_t H, int64_t E,
              double sigma, float* z, float* g) override;
  void expert_mix(const ExpertMixArgs& args) override;
  void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) override;
  void log_softmax_rows(const float* x, int64_t rows, int64_t n, float* y) override;

  // y[T, w.cols] (+)= x[T, w.rows] . w   (w used as a [K, N] matrix; expert outputs)
  void matmul_nn(const float* x, int64_t T, const Weight& w, float* y, bool accumulate);
  // y[r] = w[row0 + r, :] . x   for r < nrows (one token)
  void dot_rows(const Weight& w, int64_t row0, int64_t nrows, const float* x, float* y) const;
  // out[c] += sum_r coef[r] * w[row0 + r, c] over columns [c0, c1)
  void axpy_rows(const Weight& w, int64_t row0, int64_t nrows, const float* coef, float* out, int64_t c0,
                 int64_t c1) const;
  // The T rows x[T, K] as Q8 activation blocks [T, K / 32], in the calling
  // thread's buffer `slot` (0 or 1), valid until its next call with that slot.
  const BlockQ8Act* quantize_activations(const float* x, int64_t T, int64_t K, int slot) const;
  // One token's nb blocks laid out for the one-token loop over many rows, in
  // the calling thread's buffer `slot` (0 or 1); null where the kernels have
  // no such loop or the rows are longer than it takes (kQ8TokenSteps steps):
  // then dot_rows with T = 1 makes the same sums.
  const Q8Token* prepare_token(const BlockQ8Act* xq, int64_t nb, int slot) const;

 private:
  // r1, r2: the kept (token, expert) entries of each side (expert_mix.cpp)
  void expert_mix_dense(const ExpertMixArgs& a, const SideEntries& r1, const SideEntries& r2);
  void expert_mix_sparse(const ExpertMixArgs& a, const SideEntries& r1, const SideEntries& r2);

  int threads_;
  const KernelSet& k_;
  GemmCompute products(const Weight& w) const;  // the arithmetic of GEMMs with w
  // Whether products with w take bf16-rounded inputs on every path (the row
  // kernels of small batches and sparse experts as well as the GEMMs).
  bool rounds_inputs(const Weight& w) const;
  // y[t, :] += bias for t < T (no bias: nothing)
  void add_bias(const Weight* bias, int64_t T, int64_t N, float* y);
  // blocks of 64 rows a thread takes at a time in linear's streamed products
  int64_t block_run(int64_t blocks) const;
  Compute compute_;
  bool huge_pages_, copies_of_mapped_;
  // With huge pages, memory of at least kHugePageMinBytes comes in 2 MiB
  // pages where the kernel offers them and at least 2 GiB stay free; null otherwise.
  static constexpr size_t kHugePageMinBytes = size_t(2) << 20;
  std::shared_ptr<void> huge_page_memory(size_t bytes) const;
  // What router() bounds logits with, per router weight, by weight data:
  // the Euclidean norms of its rows and (for a few tokens) its int8 copy. A
  // model's weights live as long as its backend; an entry whose shape or
  // first and last bytes differ from the weight now at that address (a
  // weight freed and another allocated there) is computed again (a weight
  // changed in place elsewhere keeps its old entry: weights are read-only).
  // Shared, so a caller's copy stays valid while another call replaces it.
  struct Int8Copy {
    Weight q8;                     // the rows as Q8_0 blocks
    std::vector<float> err_norms;  // ||w_e - q8_e|| per row, rounded up
  };
  struct RouterAids {
    int64_t rows = 0, cols = 0;
    std::vector<uint8_t> edges;  // the weight's first and last kEdgeBytes bytes
    std::shared_ptr<const std::vector<float>> norms;
    std::shared_ptr<const Int8Copy> int8;
  };
  static constexpr size_t kEdgeBytes = 64;
  RouterAids& router_aids(const Weight& w);  // the entry of w, emptied if stale (router_aids_mutex_ held)
  std::shared_ptr<const std::vector<float>> row_norms(const Weight& w);
  std::shared_ptr<const Int8Copy> int8_copy(const Weight& w);
  std::mutex router_aids_mutex_;
  std::unordered_map<const void*, RouterAids> router_aids_;
  // router() for up to kSmallBatch tokens with bf16 weights: int8 products bound the logits
  void router_int8_bounded(const Weight& w, const float* x, int64_t T, const Weight& mean, const Weight& var,
                           int64_t H, int64_t E, double sigma, float* z, float* g);
};

// Per-thread scratch of at least n floats (slot: independent buffers of one
// thread); reused across calls, so hot loops allocate nothing.
float* thread_scratch(int slot, size_t n);

// y[i] = x[i] rounded to bf16 (nearest even), as float32; y may be x.
void round_to_bf16(const float* x, int64_t n, float* y);

}  // namespace monet::cpu
