#include "monet/evaluate.h"

#include <algorithm>
#include <cmath>

#include "monet/error.h"

namespace monet {

void for_each_window(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                     const ForwardOptions& opts, const WindowFn& fn) {
  if (context < 2 || context > model.config().max_position_embeddings)
    fail("the context must hold between 2 and max_position_embeddings = ", model.config().max_position_embeddings,
         " tokens, got ", context);
  const size_t first = bos >= 0 ? 1 : 0, step = size_t(context) - first;
  std::vector<float> logits;
  for (size_t start = 0; start < ids.size(); start += step) {
    std::vector<int32_t> window;
    if (bos >= 0) window.push_back(bos);
    window.insert(window.end(), ids.begin() + ptrdiff_t(start), ids.begin() + ptrdiff_t(std::min(ids.size(), start + step)));
    RouterCapture routing;
    ForwardOptions fo = opts;
    fo.capture = &routing;
    KvCache cache = model.new_cache(int64_t(window.size()));
    model.forward(cache, window.data(), int64_t(window.size()), logits, fo);
    fn(window, first, start, logits, routing);
  }
}

LossResult evaluate_loss(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                         const ExpertMask* mask) {
  const int64_t V = model.config().vocab_size;
  LossResult r;
  ForwardOptions fo;
  fo.mask = mask;
  for_each_window(model, ids, context, bos, fo, [&](const std::vector<int32_t>& window, size_t, size_t,
                                                    const std::vector<float>& logits, const RouterCapture&) {
    for (size_t t = 0; t + 1 < window.size(); t++) {
      const float* row = logits.data() + t * size_t(V);
      const float mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; v++) sum += std::exp(double(row[v]) - mx);
      r.total_nll += std::log(sum) + mx - double(row[window[t + 1]]);
      r.tokens++;
    }
  });
  return r;
}

}  // namespace monet
