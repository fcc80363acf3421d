#include <algorithm>

#include "monet/error.h"
#include "monet/evaluate.h"
#include "monet/interp.h"

namespace monet {

RoutingStats routing_stats(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos) {
  const MonetConfig& c = model.config();
  const int64_t H = c.moe_heads, E = c.moe_experts;
  RoutingStats s;
  s.sum.assign(size_t(c.num_router_layers()), std::vector<double>(size_t(E * E), 0.0));
  ForwardOptions fo;
  fo.routing_only = true;
  for_each_window(model, ids, context, bos, fo, [&](const std::vector<int32_t>& window, size_t first, size_t,
                                                    const std::vector<float>&, const RouterCapture& cap) {
    // BOS is a fixed prefix, not text of the domain: leave it out.
    for (size_t t = first; t < window.size(); t++) {
      for (size_t g = 0; g < cap.g1.size(); g++)
        for (const ExpertActivation& a : active_experts(cap.g1[g].data() + t * size_t(H * E),
                                                        cap.g2[g].data() + t * size_t(H * E), H, E, 0.0f))
          s.sum[g][size_t(a.id)] += a.prob;
      s.tokens++;
    }
  });
  return s;
}

std::vector<ExpertMask> domain_experts(const MonetConfig& c, const std::vector<RoutingStats>& domains, double ratio,
                                       double min_prob) {
  std::vector<ExpertMask> masks;
  const size_t groups = size_t(c.num_router_layers()), n = size_t(c.moe_experts * c.moe_experts);
  for (size_t d = 0; d < domains.size(); d++) {
    ExpertMask m = ExpertMask::none(c);
    for (size_t g = 0; g < groups; g++)
      for (size_t id = 0; id < n; id++) {
        const double p = domains[d].mean(g, id);
        if (p < min_prob || p <= 0.0) continue;
        bool dominant = true;
        for (size_t o = 0; o < domains.size() && dominant; o++)
          if (o != d && p < ratio * domains[o].mean(g, id)) dominant = false;
        if (dominant) m.add_expert(int64_t(g), int64_t(id));
      }
    masks.push_back(std::move(m));
  }
  return masks;
}

}  // namespace monet
