// Language-model loss of a checkpoint on a token stream.
#pragma once
#include <cstdint>
#include <vector>

#include "monet/model.h"

namespace monet {

struct LossResult {
  int64_t tokens = 0;      // predicted tokens
  double total_nll = 0;    // sum of -log p(token)
  double mean() const { return tokens ? total_nll / double(tokens) : 0.0; }
};

// Splits `ids` into windows of at most `context` tokens, each starting with
// `bos` (when >= 0) followed by the next context-1 tokens of the stream, and
// sums the next-token negative log-likelihood of every token after the first.
LossResult evaluate_loss(const Model& model, const std::vector<int32_t>& ids, int64_t context, int32_t bos,
                         const ExpertMask* mask = nullptr);

}  // namespace monet
