// Language-model loss of a checkpoint on a token stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "monet/model.h"

namespace monet {

struct LossResult {
  int64_t tokens = 0;      // predicted tokens
  double total_nll = 0;    // sum of -log p(token)
  double mean() const { return tokens ? total_nll / double(tokens) : 0.0; }
};

// Runs the model over a token stream in windows of at most `context` tokens,
// each starting with `bos` (when >= 0) followed by the next tokens of the
// stream. fn(window, first, logits, routing) is called per window; window[t]
// for t >= first is stream token start + t - first, where start is passed too.
// Windows start at begin, begin + step, ... (step = context - 1 with a BOS),
// those before `end` (a window is never cut short by `end`).
using WindowFn = std::function<void(const std::vector<int32_t>& window, size_t first, size_t start,
                                    const std::vector<float>& logits, const RouterCapture& routing)>;
void for_each_window(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                     const ForwardOptions& opts, const WindowFn& fn, size_t begin = 0, size_t end = SIZE_MAX);
// The same over the windows starting at `starts` (each start < ids.size()),
// in that order: a process's share of a stream's windows.
void for_each_window_at(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                        const ForwardOptions& opts, const WindowFn& fn, const std::vector<size_t>& starts);

// Splits `ids` into windows of at most `context` tokens, each starting with
// `bos` (when >= 0) followed by the next context-1 tokens of the stream, and
// sums the next-token negative log-likelihood of every token after the first.
LossResult evaluate_loss(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                         const ExpertMask* mask = nullptr);

}  // namespace monet
