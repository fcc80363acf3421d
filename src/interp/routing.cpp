#include <algorithm>

#include "monet/interp.h"

namespace monet {

std::vector<ExpertActivation> active_experts(const float* g1, const float* g2, int64_t H, int64_t E,
                                             float threshold, bool sorted) {
  std::vector<int32_t> s1, s2;
  for (int64_t i = 0; i < E; i++) {
    bool on1 = false, on2 = false;
    for (int64_t h = 0; h < H; h++) {
      on1 |= g1[h * E + i] > 0.0f;
      on2 |= g2[h * E + i] > 0.0f;
    }
    if (on1) s1.push_back(int32_t(i));
    if (on2) s2.push_back(int32_t(i));
  }
  std::vector<ExpertActivation> out;
  for (int32_t i : s1)
    for (int32_t j : s2) {
      float p = 0.0f;
      for (int64_t h = 0; h < H; h++) p += g1[h * E + i] * g2[h * E + j];
      if (p > threshold) out.push_back({int64_t(i) * E + j, i, j, p});
    }
  if (sorted)
    std::sort(out.begin(), out.end(), [](const ExpertActivation& a, const ExpertActivation& b) {
    return a.prob > b.prob || (a.prob == b.prob && a.id < b.id);
  });
  return out;
}

TokenExperts token_experts(const RouterCapture& cap, size_t t, size_t g, int64_t H, int64_t E, float threshold,
                           const ExpertMask* mask) {
  const size_t HE = size_t(H * E);
  TokenExperts out;
  for (const ExpertActivation& a : active_experts(cap.g1[g].data() + t * HE, cap.g2[g].data() + t * HE, H, E, threshold))
    (mask && mask->removed(int64_t(g), a.i, a.j) ? out.removed : out.kept).push_back(a);
  return out;
}

}  // namespace monet
