#include "monet/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <unordered_set>

#include "monet/error.h"

namespace monet {

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  if (p.temperature < 0) fail("--temperature must be >= 0, got ", p.temperature);
  if (p.top_p <= 0 || p.top_p > 1) fail("--top-p must be in (0, 1], got ", p.top_p);
  if (p.min_p < 0 || p.min_p >= 1) fail("--min-p must be in [0, 1), got ", p.min_p);
  if (p.repeat_penalty <= 0) fail("--repeat-penalty must be > 0, got ", p.repeat_penalty);
  if (p.top_k < 0) fail("--top-k must be >= 0, got ", p.top_k);
}

int32_t Sampler::sample(const float* logits, int64_t vocab, const std::vector<int32_t>& history) {
  cand_.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; i++) cand_[size_t(i)] = {logits[i], int32_t(i)};
  if (p_.repeat_penalty != 1.0f) {
    const size_t n = p_.repeat_last_n < 0 ? history.size() : std::min(history.size(), size_t(p_.repeat_last_n));
    std::unordered_set<int32_t> seen(history.end() - ptrdiff_t(n), history.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= vocab) continue;
      float& l = cand_[size_t(id)].first;
      l = l > 0 ? l / p_.repeat_penalty : l * p_.repeat_penalty;
    }
  }
  if (p_.temperature == 0.0f) {
    // Greedy: first maximum, as torch.argmax.
    size_t best = 0;
    for (size_t i = 1; i < cand_.size(); i++)
      if (cand_[i].first > cand_[best].first) best = i;
    return cand_[best].second;
  }
  for (auto& c : cand_) c.first /= p_.temperature;
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = cand_.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    keep = size_t(p_.top_k);
    std::partial_sort(cand_.begin(), cand_.begin() + ptrdiff_t(keep), cand_.end(), by_logit);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  cand_.resize(keep);
  // softmax over the candidates (sorted, so the max is first)
  std::vector<double> prob(cand_.size());
  double sum = 0;
  for (size_t i = 0; i < cand_.size(); i++) sum += prob[i] = std::exp(double(cand_[i].first - cand_[0].first));
  for (double& p : prob) p /= sum;
  if (p_.top_p < 1.0f) {
    double cum = 0;
    size_t n = 0;
    while (n < prob.size()) {
      cum += prob[n++];
      if (cum >= p_.top_p) break;
    }
    prob.resize(n);
  }
  if (p_.min_p > 0.0f) {
    const double floor = p_.min_p * prob[0];
    size_t n = 1;
    while (n < prob.size() && prob[n] >= floor) n++;
    prob.resize(n);
  }
  double total = 0;
  for (double p : prob) total += p;
  const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double cum = 0;
  for (size_t i = 0; i < prob.size(); i++) {
    cum += prob[i];
    if (r < cum) return cand_[i].second;
  }
  return cand_[prob.size() - 1].second;
}

std::vector<int32_t> generate(const Model& model, KvCache& cache, const std::vector<int32_t>& prompt,
                              const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token,
                              GenerateStats* stats) {
  using clock = std::chrono::steady_clock;
  const int64_t V = model.config().vocab_size;
  Sampler sampler(opts.sampling);  // validates the sampling options first
  if (prompt.empty()) fail("generate: the prompt has no tokens");
  const int64_t context = model.config().max_position_embeddings;
  if (cache.length + int64_t(prompt.size()) > context)
    fail("generate: ", cache.length, " cached + ", prompt.size(), " prompt tokens exceed max_position_embeddings = ",
         context);
  // Generation stops where the context ends.
  const int64_t max_tokens = std::min(opts.max_tokens, context - cache.length - int64_t(prompt.size()));
  std::vector<int32_t> history = prompt, out;
  std::vector<float> logits;
  ForwardOptions fo;
  fo.all_logits = false;
  fo.mask = opts.mask;
  auto t0 = clock::now();
  model.forward(cache, prompt.data(), int64_t(prompt.size()), logits, fo);
  auto t1 = clock::now();
  for (int64_t step = 0; step < max_tokens; step++) {
    const int32_t id = sampler.sample(logits.data(), V, history);
    if (std::find(opts.stop_ids.begin(), opts.stop_ids.end(), id) != opts.stop_ids.end()) break;
    out.push_back(id);
    history.push_back(id);
    if (!on_token(id)) break;
    if (step + 1 < max_tokens) model.forward(cache, &id, 1, logits, fo);
  }
  auto t2 = clock::now();
  if (stats) {
    stats->prompt_tokens = int64_t(prompt.size());
    stats->generated_tokens = int64_t(out.size());
    stats->prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    stats->generate_seconds = std::chrono::duration<double>(t2 - t1).count();
    stats->hit_context_end = max_tokens < opts.max_tokens && int64_t(out.size()) == max_tokens;
  }
  return out;
}

}  // namespace monet
