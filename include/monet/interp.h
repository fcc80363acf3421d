// Routing introspection: which composed experts a token activates.
#pragma once
#include <cstdint>
#include <vector>

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
                                             float threshold);

}  // namespace monet
