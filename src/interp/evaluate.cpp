#include "monet/evaluate.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/monet_math.h"
#include "monet/error.h"

namespace monet {

void for_each_window(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                     const ForwardOptions& opts, const WindowFn& fn, size_t begin, size_t end) {
  if (context < 2 || context > model.config().max_position_embeddings)
    fail("the context must hold between 2 and max_position_embeddings = ", model.config().max_position_embeddings,
         " tokens, got ", context);
  const size_t first = bos >= 0 ? 1 : 0, step = size_t(context) - first;
  std::vector<size_t> starts;
  for (size_t start = begin; start < std::min(end, ids.size()); start += step) starts.push_back(start);
  for_each_window_at(model, ids, context, bos, opts, fn, starts);
}

void for_each_window_at(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                        const ForwardOptions& opts, const WindowFn& fn, const std::vector<size_t>& starts) {
  if (context < 2 || context > model.config().max_position_embeddings)
    fail("the context must hold between 2 and max_position_embeddings = ", model.config().max_position_embeddings,
         " tokens, got ", context);
  const size_t first = bos >= 0 ? 1 : 0, step = size_t(context) - first;
  for (size_t start : starts)
    if (start >= ids.size()) fail("window start ", start, " is outside the stream of ", ids.size(), " tokens");
  // Windows are independent: with a small model, whole windows run side by
  // side, one per thread (the ops inside a window then run single-threaded,
  // and no op pays for thread synchronisation: the default model indexes
  // 1.8x faster so). A large model's windows run one after another with
  // every thread in each op: side by side, each thread would stream all the
  // weights from memory for its own window (Monet-VD-1.4B shape, 2 threads:
  // 140 tok/s side by side, 2x that one at a time). fn still sees the
  // windows in order. Each window is its own forward call, so its results do
  // not depend on which windows run beside it.
  constexpr size_t kSideBySideMaxWeightBytes = size_t(64) << 20;
  const size_t batch = model.weight_bytes() > kSideBySideMaxWeightBytes
                           ? 1
                           : std::max<size_t>(1, std::min<size_t>(size_t(model.threads()), starts.size()));
  struct Result {
    std::vector<int32_t> window;
    std::vector<float> logits;
    RouterCapture routing;
    KvCache cache;
  };
  std::vector<Result> results(batch);
  for (size_t b0 = 0; b0 < starts.size(); b0 += batch) {
    const size_t nb = std::min(batch, starts.size() - b0);
    auto run = [&](size_t i) {
      Result& r = results[i];
      const size_t start = starts[b0 + i];
      r.window.clear();
      if (bos >= 0) r.window.push_back(bos);
      r.window.insert(r.window.end(), ids.begin() + ptrdiff_t(start),
                      ids.begin() + ptrdiff_t(std::min(ids.size(), start + step)));
      r.routing = RouterCapture();
      if (r.cache.capacity < int64_t(r.window.size())) r.cache = model.new_cache(context);
      r.cache.length = 0;
      ForwardOptions fo = opts;
      fo.capture = &r.routing;
      model.forward(r.cache, r.window.data(), int64_t(r.window.size()), r.logits, fo);
    };
    if (nb == 1) {
      run(0);
    } else {
      std::string error;
#pragma omp parallel for num_threads(int(nb)) schedule(static, 1)
      for (size_t i = 0; i < nb; i++) {
        try {
          run(i);
        } catch (const std::exception& e) {
#pragma omp critical
          error = e.what();
        }
      }
      if (!error.empty()) throw Error(error);
    }
    for (size_t i = 0; i < nb; i++) fn(results[i].window, first, starts[b0 + i], results[i].logits, results[i].routing);
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
      r.total_nll += nll_from_logits(logits.data() + t * size_t(V), V, window[t + 1]);
      r.tokens++;
    }
  });
  return r;
}

}  // namespace monet
