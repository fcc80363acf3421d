// A loaded Monet model and its forward pass (docs/monet.md), over a backend
// (src/backend). One Model may be used from several threads at once: a
// forward call only reads the model; each call owns its caches and outputs.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "monet/config.h"
#include "monet/tensor.h"
#include "monet/weights.h"

namespace monet {

class Backend;
class TensorStore;
struct ExpertMask;

struct LoadOptions {
  std::string device = "cpu";  // the backend ("cpu": the only one of this build; docs/architecture.md)
  int threads = 0;             // CPU threads this model's forward passes use; 0: all cores
  std::string cpu_kernels;     // "" (best this CPU runs), "avx512bf16", "avx512", "avx2" or "generic"
  // Arithmetic of large matrix products: "auto" (bf16 products for bf16
  // weights where the CPU multiplies bf16 natively, float32 otherwise), "f32" (exact float32) or
  // "bf16". docs/architecture.md, "Accuracy and speed of bf16 products".
  std::string compute = "auto";
  // Weights in 2 MiB pages where the kernel offers them (a streamed weight
  // then rarely misses the TLB: decode about 1.3x faster). The weight files
  // are always mapped so that the page cache's 2 MiB pages of them map whole;
  // with this option a file cached in 4 KiB pages is read again into 2 MiB
  // ones (once: the page cache keeps them for later loads), and weights the
  // load converts (not read in place; and all of them where the files cannot
  // be mapped in 2 MiB pages) are copied into huge pages where memory
  // allows. docs/architecture.md, "Huge pages".
  bool huge_pages = false;
};

// Keys and values of every layer for the positions seen so far, in the
// model's backend memory. Move-only; grows as tokens are added.
struct KvCache {
  int64_t length = 0;    // positions filled
  int64_t capacity = 0;  // positions allocated
  std::vector<Buffer> k, v;  // per layer: [capacity, nkv*hd]
};

// Router probabilities of one forward call: for router layer r (layer r*G),
// g1[r] and g2[r] are [n, H, E], the probabilities after threshold + softmax.
struct RouterCapture {
  std::vector<std::vector<float>> g1, g2;
};

// Intermediate activations to return, by name (TransformerLens style), each
// [n, d]: "resid_pre.{l}" (the residual stream entering layer l),
// "attn_out.{l}" (the attention block's output), "moe_out.{l}" (the expert
// mix's output), "resid_post.{l}" (the residual stream leaving layer l).
struct ActivationCapture {
  std::vector<std::string> names;                    // what to capture
  std::map<std::string, std::vector<float>> values;  // filled by the forward call
};

enum class Logits { None, Last, All };

// One sequence of a batched forward call: n new tokens at positions
// cache->length .. cache->length + n - 1, appended to its own cache.
struct Sequence {
  KvCache* cache = nullptr;
  const int32_t* ids = nullptr;  // [n] token ids
  int64_t n = 0;
  const float* embeds = nullptr;  // optional [n, d] input embeddings used instead of the ids' (host memory)
  Logits logits = Logits::Last;
  std::vector<float>* logits_out = nullptr;  // [n, V] (All) or [1, V] (Last)
  RouterCapture* routing = nullptr;          // appends one entry per router layer
  ActivationCapture* activations = nullptr;
  const ExpertMask* mask = nullptr;          // experts scaled or removed for this sequence
};

struct BatchOptions {
  ExpertPath expert_path = ExpertPath::Auto;
  // Only the routing is wanted: stop after the last router layer's router,
  // compute no logits and do not advance the caches (their later layers are
  // not filled).
  bool routing_only = false;
};

// Options of the single-sequence forward().
struct ForwardOptions {
  bool all_logits = true;  // logits for every token; else only the last
  RouterCapture* capture = nullptr;
  ActivationCapture* activations = nullptr;
  const ExpertMask* mask = nullptr;
  ExpertPath expert_path = ExpertPath::Auto;
  bool routing_only = false;  // as BatchOptions::routing_only; `logits` is left empty
};

class Model {
 public:
  // Loads config.json and the safetensors weights of a checkpoint directory.
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& opts = {});
  ~Model();

  const MonetConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const std::string& dir() const { return dir_; }
  int threads() const;
  std::string backend_name() const;
  Backend& backend() const { return *backend_; }  // for the library's own algorithms (src/interp)
  int64_t parameter_count() const;
  size_t weight_bytes() const;  // bytes of the weights as loaded for compute
  // Bytes of the mapped weight files that 2 MiB pages map now (LoadOptions::huge_pages).
  size_t file_huge_page_bytes() const;

  KvCache new_cache(int64_t capacity = 0) const;

  // Runs a batch of independent sequences in one pass: prompts of different
  // lengths and single decode tokens mixed, each with its own cache, mask
  // and outputs. Every expert slice is read once for all the tokens that
  // selected it.
  void forward_batch(std::vector<Sequence>& seqs, const BatchOptions& opts = {}) const;

  // One sequence: runs `n` tokens at positions cache.length .., appending
  // their keys/values to the cache. Writes logits [n, V] (all_logits) or
  // [1, V] into `logits`.
  void forward(KvCache& cache, const int32_t* ids, int64_t n, std::vector<float>& logits,
               const ForwardOptions& opts = {}) const;

  // The input embeddings of token ids: out [n, d] (host memory).
  void embed_tokens(const int32_t* ids, int64_t n, float* out) const;

 private:
  Model() = default;
  MonetConfig config_;
  std::string dir_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<TensorStore> store_;
  ModelWeights weights_;
};

}  // namespace monet
