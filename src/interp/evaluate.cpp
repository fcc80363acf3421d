#include "monet/evaluate.h"

#include <algorithm>
#include <cmath>

#include "monet/error.h"

namespace monet {

LossResult evaluate_loss(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                         const ExpertMask* mask) {
  if (context < 2) fail("evaluate: the context must hold at least 2 tokens");
  const int64_t V = model.config().vocab_size;
  const int64_t step = bos >= 0 ? context - 1 : context;
  LossResult r;
  std::vector<float> logits;
  ForwardOptions fo;
  fo.mask = mask;
  for (size_t start = 0; start < ids.size(); start += size_t(step)) {
    std::vector<int32_t> window;
    if (bos >= 0) window.push_back(bos);
    window.insert(window.end(), ids.begin() + ptrdiff_t(start),
                  ids.begin() + ptrdiff_t(std::min(ids.size(), start + size_t(step))));
    if (window.size() < 2) break;
    KvCache cache = model.new_cache(int64_t(window.size()));
    model.forward(cache, window.data(), int64_t(window.size()), logits, fo);
    for (size_t t = 0; t + 1 < window.size(); t++) {
      const float* row = logits.data() + t * size_t(V);
      const float mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; v++) sum += std::exp(double(row[v]) - mx);
      r.total_nll += std::log(sum) + mx - double(row[window[t + 1]]);
      r.tokens++;
    }
  }
  return r;
}

}  // namespace monet
