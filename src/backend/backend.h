// The backend interface: every operation the model graph (src/model) and the
// vision encoder run, on memory the backend owns. The CPU backend
// (src/backend/cpu) implements it; a device backend (src/backend/cuda)
// implements the same ops and passes the same per-op harness
// (tests/cpp/test_backend_ops.cpp) against plain loops.
//
// Conventions: activations are float32, row-major, pointers into memory from
// alloc() (device memory on a GPU backend: never read on the host except
// through to_host). Weights come as Weight (any weight dtype) after
// prepare(). Shapes are given in comments as [rows, cols].
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "monet/config.h"
#include "monet/mask.h"
#include "monet/tensor.h"
#include "monet/weights.h"

namespace monet {

// One sequence of a batch, as attention sees it: its queries are rows
// [row0, row0 + n) of q and out, at positions pos0 .. pos0 + n - 1; its keys
// and values for positions 0 .. pos0 + n - 1 (the new ones included) are the
// first rows of k and v.
struct AttentionSeq {
  int64_t row0 = 0, n = 0, pos0 = 0;
  const float* k = nullptr;  // [pos0 + n, nkv * hd]
  const float* v = nullptr;  // [pos0 + n, nkv * hd]
};

// The Monet expert mix of one layer (docs/monet.md): out = the VD or HD mix
// of y under router probabilities g1, g2, with each token's mask (nullptr:
// none) scaling or removing experts of router group `group`.
struct ExpertMixArgs {
  const MonetConfig* config = nullptr;
  const ExpertWeights* weights = nullptr;
  int64_t T = 0;
  const float* y = nullptr;                   // [T, d] post-attention-norm activations
  const float* g1 = nullptr;                  // [T, H, E] router probabilities
  const float* g2 = nullptr;                  // [T, H, E]
  const ExpertMask* const* masks = nullptr;   // [T] (host array) or nullptr: no masks
  int64_t group = 0;
  ExpertPath path = ExpertPath::Auto;
  float* out = nullptr;                       // [T, d], overwritten
  // g1 and g2 hold what they held at this thread's previous expert_mix call
  // (a router group's later layers): a backend may reuse what it derived
  // from them then, if that call had the same g1, g2, T, moe_heads and
  // moe_experts.
  bool same_routing = false;
};

enum class Activation { Relu2, GeluQuick, Gelu };  // relu(x)^2; x*sigmoid(1.702x); exact erf GELU

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // e.g. "cpu (avx512bf16 kernels, 2 threads)"
  virtual int threads() const = 0;

  // --- memory -------------------------------------------------------------
  virtual Buffer alloc(size_t bytes) = 0;  // contents undefined
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // within the backend
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void from_host(void* dst, const void* host_src, size_t bytes) = 0;
  // The weight in the form this backend reads (the CPU backend reads host
  // weights as they are; a device backend uploads).
  virtual Weight prepare(const Weight& w) = 0;

  // --- ops ----------------------------------------------------------------
  // x[t] = table[ids[t]] as float32. ids is a host array. x: [T, table.cols]
  virtual void embed(const Weight& table, const int32_t* ids, int64_t T, float* x) = 0;
  // y[T, w.rows] = x[T, w.cols] . w^T (+ bias[1, w.rows]). exact: float32
  // products whatever the compute mode (the router's logits: its selection
  // is a threshold, so rounding would flip experts in and out).
  virtual void linear(const Weight& w, const float* x, int64_t T, float* y, const Weight* bias = nullptr,
                      bool exact = false) = 0;
  // y[t] = w * x[t] / sqrt(mean(x[t]^2) + eps); x, y: [T, d]; w: [1, d]
  virtual void rmsnorm(const float* x, const Weight& w, int64_t T, int64_t d, double eps, float* y) = 0;
  // y[t] = (x[t] - mean) / sqrt(var + eps) * w + b (biased variance); x, y: [T, d]
  virtual void layernorm(const float* x, const Weight& w, const Weight& b, int64_t T, int64_t d, double eps,
                         float* y) = 0;
  virtual void add(float* x, const float* y, int64_t n) = 0;  // x += y
  virtual void activation(Activation a, float* x, int64_t n) = 0;  // in place
  // Rotary embedding (rotate_half pairs (i, i + hd/2)) in place on
  // x[T, heads*hd]; cos_t, sin_t [T, hd/2] are the angles of each row's
  // position (rope_angles in src/core/rope.h).
  virtual void rope(float* x, int64_t T, int64_t heads, int64_t hd, const float* cos_t, const float* sin_t) = 0;
  // Scaled dot-product attention of each sequence's queries over its keys
  // (causal: a query sees positions up to its own). q, out: [rows, nh*hd];
  // GQA: query head h reads kv head h / (nh / nkv). seqs is a host array.
  // projections: the dtype of the q projection's weights; under
  // Compute::Auto the products round q, k, v and the softmax weights to bf16
  // where linear's would for such weights (BF16: always, F32: never).
  virtual void attention(const float* q, const AttentionSeq* seqs, int64_t n_seqs, int64_t nh, int64_t nkv,
                         int64_t hd, bool causal, float* out, DType projections = DType::F32) = 0;
  // Router selection: z [T, H, E] raw logits -> g [T, H, E] probabilities
  // (BatchNorm with running statistics mean/var [1, H], threshold
  // min(max_i n_i, sigma), softmax of the raw logits over the kept entries).
  virtual void router_select(const float* z, const Weight& mean, const Weight& var, int64_t T, int64_t H,
                             int64_t E, double sigma, float* g) = 0;
  // A router: g [T, H, E] = router_select(x [T, w.cols] . w^T) with the
  // logits of linear(exact). z [T, H*E] is scratch (its contents after the
  // call unspecified): a backend may compute exactly only the logits that can
  // pass the threshold (the kept ones, whose softmax needs them), as long as
  // g is the one the exact logits give.
  virtual void router(const Weight& w, const float* x, int64_t T, const Weight& mean, const Weight& var, int64_t H,
                      int64_t E, double sigma, float* z, float* g) {
    linear(w, x, T, z, nullptr, /*exact=*/true);
    router_select(z, mean, var, T, H, E, sigma, g);
  }
  virtual void expert_mix(const ExpertMixArgs& args) = 0;

  // --- sampling helpers (results on the host) ------------------------------
  // out[r] = argmax of row r of x [rows, n] (the first maximum, as torch.argmax)
  virtual void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) = 0;
  // y[r] = log_softmax(x[r]) for rows of x [rows, n]; y may be x
  virtual void log_softmax_rows(const float* x, int64_t rows, int64_t n, float* y) = 0;
};

// The arithmetic of large matrix products (GEMMs): F32 is exact float32 for
// every weight dtype; BF16 rounds the activations to bf16 and multiplies them
// with the weights in bf16, summing in float32 (AMX or AVX-512-BF16 through
// oneDNN; emulated exactly elsewhere). Auto: BF16 for bf16 weights where the
// CPU multiplies bf16 natively (twice float32's rate with AVX-512-BF16, more
// with AMX), F32 otherwise. Small batches (the row kernels) and the sparse
// experts round their inputs the same way (the paths then differ by float32
// summation order, not by bf16 rounding); the routers are float32 in every mode.
// docs/architecture.md, "Accuracy and speed of bf16 products".
enum class Compute { Auto, F32, BF16 };

struct BackendOptions {
  std::string device = "cpu";    // "cpu" (the only backend of this build; see docs/architecture.md)
  int threads = 0;               // CPU threads; 0: all cores
  std::string cpu_kernels;       // "" / "auto": the best this CPU runs; or "avx512bf16", "avx512", "avx2", "generic"
  std::string compute = "auto";  // "auto", "f32" or "bf16" (see Compute)
  bool huge_pages = false;       // prepare() may copy large weights into huge pages (LoadOptions::huge_pages)
  bool huge_page_copies_of_mapped = false;  // ... weights read in place from the files too (not in 2 MiB pages)
};

// The backend the options name; monet::Error for a device this build lacks.
std::unique_ptr<Backend> make_backend(const BackendOptions& opts);

}  // namespace monet
