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

// Weights `monet quantize` stores as block int8 (docs/quantization.md): the
// attention, expert and lm_head matrices (the embedding when tied, as it is
// the lm_head then). Norms, routers, biases and BatchNorm statistics stay in
// full precision so that routing stays faithful.
bool quantized_role(TensorRole role, bool tied_embeddings);
// The dimension of the HF tensor the blocks run along: 1 (the input) for
// linear layers; 0 (the output, hidden_size / 2) for the expert v matrices,
// whose input is one expert's moe_dim / 2 values, fewer than a block.
int quant_axis(TensorRole role);
// The name of the scale tensor of a quantized weight: "<name>_scale".
std::string quant_scale_name(const std::string& name);

// "model.layers.{l}.router.norm{side}.{stat}" (side 1 or 2, stat running_mean / running_var / num_batches_tracked)
std::string router_norm_name(int64_t layer, int side, const std::string& stat);

}  // namespace monet
