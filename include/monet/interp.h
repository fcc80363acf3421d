// Routing introspection: which composed experts a token activates.
#pragma once
#include <cstdint>
#include <vector>

#include "monet/mask.h"
#include "monet/model.h"

namespace monet {

struct ExpertActivation {
  int64_t id;   // i * E + j
  int32_t i, j;
  float prob;   // sum_h g1[h,i] * g2[h,j]
};

// The experts of one token and router group whose probability exceeds
// `threshold`, most probable first. g1, g2: [H, E]. Only pairs of kept
// components are visited (never E^2 values).
std::vector<ExpertActivation> active_experts(const float* g1, const float* g2, int64_t H, int64_t E,
                                             float threshold, bool sorted = true);
// The same unsorted into `out` (its capacity reused: one call per token).
void active_experts(const float* g1, const float* g2, int64_t H, int64_t E, float threshold,
                    std::vector<ExpertActivation>& out);

// The experts of token t in router group g of a capture, split by a mask:
// a removed expert's weight is zero, so it is listed apart, not as firing.
struct TokenExperts {
  std::vector<ExpertActivation> kept, removed;  // each most probable first
};
TokenExperts token_experts(const RouterCapture& cap, size_t t, size_t g, int64_t H, int64_t E, float threshold,
                           const ExpertMask* mask);

// Mean routing probability of every expert of every router group over a
// token stream (windows as in evaluate_loss): mean[g][i*E + j].
struct RoutingStats {
  int64_t tokens = 0;
  std::vector<std::vector<double>> sum;  // [groups][E*E]
  double mean(size_t g, size_t id) const { return tokens ? sum[g][id] / double(tokens) : 0.0; }
};

RoutingStats routing_stats(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos);

// The paper's domain statistic: expert e of group g belongs to domain d when
// its mean routing probability on d is at least `ratio` times that on every
// other domain (and at least `min_prob`, so that experts barely used anywhere
// do not qualify by dividing noise). One mask per domain.
std::vector<ExpertMask> domain_experts(const MonetConfig& c, const std::vector<RoutingStats>& domains, double ratio,
                                       double min_prob);

// What expert `id` (= i*E + j) of router group g writes into the residual
// stream, read out through the final norm's weights and lm_head: the sum of
// its output columns over every layer of its group (its inputs are
// relu2 >= 0, so this is the direction of its contribution), as logits [V].
std::vector<float> expert_output_logits(const Model& model, int64_t group, int64_t id);

}  // namespace monet
