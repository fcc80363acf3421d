// Sampling and the generation loop.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "monet/model.h"

namespace monet {

struct SamplingParams {
  float temperature = 0.8f;  // 0: greedy (argmax, lowest id on ties)
  int top_k = 40;            // 0: off
  float top_p = 0.95f;       // 1: off
  float min_p = 0.0f;        // 0: off
  float repeat_penalty = 1.0f;  // 1: off (HF/CTRL rule: divide positive logits, multiply negative)
  int repeat_last_n = 64;       // how many recent tokens the penalty looks at (-1: all)
  uint64_t seed = 0;
};

// Turns logits into a token id. Order as HF's warpers: repetition penalty,
// temperature, top-k, top-p, min-p, then a draw from the seeded generator.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(const float* logits, int64_t vocab, const std::vector<int32_t>& history);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prompt_seconds = 0, generate_seconds = 0;
  bool hit_context_end = false;  // stopped because max_position_embeddings was reached
};

struct GenerateOptions {
  int64_t max_tokens = 128;
  std::vector<int32_t> stop_ids;  // e.g. the EOS ids; not passed to on_token
  SamplingParams sampling;
  const ExpertMask* mask = nullptr;
};

// Feeds `prompt` (after whatever `cache` already holds), then samples up to
// max_tokens tokens (fewer where the context ends), calling on_token for each; on_token returning false
// stops. Returns the generated ids (without a stop id that ended it).
std::vector<int32_t> generate(const Model& model, KvCache& cache, const std::vector<int32_t>& prompt,
                              const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token,
                              GenerateStats* stats = nullptr);

}  // namespace monet
