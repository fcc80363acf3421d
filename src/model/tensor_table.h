// The tensors of a Monet checkpoint (HF names and shapes, docs/monet.md),
// listed once for the loader, the trainer and the checkpoint writers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "monet/config.h"

namespace monet {

enum class TensorRole {
  Embed, LmHead, FinalNorm,
  InputNorm, PostNorm, Wq, Wk, Wv, Wo,
  RouterW1, RouterW2, RouterMean1, RouterVar1, RouterMean2, RouterVar2,
  U1, U1Bias, U2, U2Bias, V11, V12, V21, V22, B1, B2,  // vertical decomposition
  U, UBias, V, B,                                      // horizontal decomposition
};

enum class TensorKind {
  Matrix,        // a weight matrix (AdamW decays it)
  Bias,          // expert biases u*.bias, b1/b2/b (not decayed)
  Norm,          // RMSNorm weights (not decayed)
  RunningStat,   // BatchNorm running mean/var: buffers, not parameters
};

struct TensorSpec {
  TensorRole role;
  int64_t layer;              // -1 for embed / lm_head / final norm
  std::string name;           // HF name
  std::vector<int64_t> shape;
  TensorKind kind;
};

// Every tensor a checkpoint of config c holds, in HF order (embedding,
// layers, final norm, lm_head; lm_head absent when tied;
// num_batches_tracked counters not listed).
std::vector<TensorSpec> tensor_table(const MonetConfig& c);

// "model.layers.{l}.router.norm{side}.{stat}" (side 1 or 2, stat running_mean / running_var / num_batches_tracked)
std::string router_norm_name(int64_t layer, int side, const std::string& stat);

}  // namespace monet
