// Expert mask JSON: ExpertMask::parse_json for two model shapes; an accepted
// mask answers weight() for every expert (a finite scale) and survives to_json.
#include <cmath>

#include "fuzz_util.h"
#include "monet/config.h"
#include "monet/error.h"
#include "monet/mask.h"

namespace {

monet::MonetConfig shape(int64_t layers, int64_t groups, int64_t experts) {
  monet::MonetConfig c;
  c.num_hidden_layers = layers;
  c.moe_groups = groups;
  c.moe_experts = experts;
  c.moe_topk = 2;
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  static const monet::MonetConfig shapes[] = {shape(8, 2, 64), shape(3, 3, 16)};  // the default model; one group
  for (const monet::MonetConfig& c : shapes) {
    monet::ExpertMask m;
    try {
      m = monet::ExpertMask::parse_json(text, "mask.json", c);
    } catch (const monet::Error&) {
      continue;
    }
    const int64_t groups = c.num_router_layers(), E = c.moe_experts;
    int64_t removed = 0;
    for (int64_t g = 0; g < groups; g++)
      for (int64_t i = 0; i < E; i++)
        for (int64_t j = 0; j < E; j++) {
          const float w = m.weight(g, i, j);
          FUZZ_CHECK(std::isfinite(w));  // scales are bounded, so are their products
          removed += m.removed(g, i, j);
        }
    FUZZ_CHECK(removed <= groups * E * E);
    FUZZ_CHECK(m.entry_count() >= 0);
    const monet::ExpertMask again = monet::ExpertMask::parse_json(m.to_json(), "round-trip", c);
    FUZZ_CHECK(again.pairs == m.pairs && again.side1 == m.side1 && again.side2 == m.side2);
  }
  return 0;
}
