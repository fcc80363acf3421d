// A loaded Monet model and its forward pass (see shared/monet-spec.md).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "monet/config.h"
#include "monet/dtype.h"

namespace monet {

class TensorStore;
struct ExpertMask;

// A row-major weight matrix [rows, cols] as the kernels read it: F32 or BF16.
// `data` points into the checkpoint mapping or into `owned` (converted or
// re-laid-out at load time).
struct Weight {
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  std::shared_ptr<void> owned;

  size_t bytes() const { return size_t(rows) * size_t(cols) * (dtype == DType::BF16 ? 2 : 4); }
  const float* f32() const { return static_cast<const float*>(data); }
  const uint16_t* bf16() const { return static_cast<const uint16_t*>(data); }
};

struct RouterWeights {
  Weight w1, w2;                    // [H*E, d]
  std::vector<float> mean1, var1;   // [H] BatchNorm running stats
  std::vector<float> mean2, var2;
};

struct LayerWeights {
  std::vector<float> input_norm, post_norm;  // [d]
  Weight wq, wk, wv, wo;
  bool has_router = false;
  RouterWeights router;
  // VD: u1,u2 [E*m/2, d] with biases; v11..v22 stored expert-contiguous as
  // [E*m/2, d/2] (the transpose of the HF [d/2, E*m/2]) so that one expert's
  // slice is one contiguous block; b1,b2 [E, d/2].
  // HD: u [E*m, d] + bias; v transposed to [E*m, d]; b [E, d].
  Weight u1, u2, u;
  std::vector<float> u1_bias, u2_bias, u_bias;
  Weight v11, v12, v21, v22, v;
  Weight b1, b2, b;
};

struct ModelWeights {
  Weight embed;    // [V, d]
  Weight lm_head;  // [V, d] (the embedding when tied)
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
};

struct LoadOptions {
  int threads = 0;  // 0: all cores
};

// Keys and values of every layer for the positions seen so far.
struct KvCache {
  int64_t length = 0;    // positions filled
  int64_t capacity = 0;  // positions allocated
  std::vector<std::vector<float>> k, v;  // per layer: [capacity, nkv*hd]
};

// Router probabilities of one forward call: for router layer r (layer r*G),
// g1[r] and g2[r] are [T, H, E], the probabilities after threshold + softmax.
struct RouterCapture {
  std::vector<std::vector<float>> g1, g2;
};

struct ForwardOptions {
  bool all_logits = true;        // logits for every token; else only the last
  RouterCapture* capture = nullptr;
  const ExpertMask* mask = nullptr;  // experts removed (monet/mask.h); null: none
  // Token batches at least this long use dense GEMMs for the expert mix;
  // shorter ones gather only the expert slices their routers selected.
  int64_t dense_expert_min_tokens = 8;
  // Only the routing is wanted (capture): stop after the last router layer's
  // router, compute no logits (`logits` is left empty) and do not advance the
  // cache (its later layers are not filled).
  bool routing_only = false;
};

class Model {
 public:
  // Loads config.json and the safetensors weights of a checkpoint directory.
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& opts = {});
  ~Model();

  const MonetConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const std::string& dir() const { return dir_; }
  int threads() const { return threads_; }
  int64_t parameter_count() const;
  size_t weight_bytes() const;  // bytes of the weights as loaded for compute

  KvCache new_cache(int64_t capacity = 0) const;

  // Runs `n` tokens at positions cache.length .. cache.length+n-1, appending
  // their keys/values to the cache. Writes logits [n, V] (all_logits) or
  // [1, V] into `logits`.
  void forward(KvCache& cache, const int32_t* ids, int64_t n, std::vector<float>& logits,
               const ForwardOptions& opts = {}) const;

 private:
  Model() = default;
  MonetConfig config_;
  std::string dir_;
  int threads_ = 1;
  std::unique_ptr<TensorStore> store_;
  ModelWeights weights_;
};

}  // namespace monet
