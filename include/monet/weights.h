// The weights of a Monet model as the backends read them (shapes per
// docs/monet.md). Vectors (norms, biases, BatchNorm statistics) are F32
// weights of one row.
#pragma once
#include <vector>

#include "monet/tensor.h"

namespace monet {

// How the expert mix reads the expert weights: Dense reads every expert
// (GEMMs over all of them); Sparse reads only the slices the routers
// selected, grouped by slice so that a slice selected by several tokens is
// read once; Auto chooses per layer. The results agree to float rounding.
enum class ExpertPath { Auto, Dense, Sparse };

struct RouterWeights {
  Weight w1, w2;                  // [H*E, d]
  Weight mean1, var1, mean2, var2;  // [1, H] BatchNorm running statistics (F32)
};

// The expert weights of one layer.
// VD: u1,u2 [E*m/2, d] with biases [1, E*m/2]; v11..v22 stored
// expert-contiguous as [E*m/2, d/2] (the transpose of HF's [d/2, E*m/2]) so
// that one expert's slice is one block of rows; b1,b2 [E, d/2].
// HD: u [E*m, d] + bias; v transposed to [E*m, d]; b [E, d].
struct ExpertWeights {
  Weight u1, u2, u;
  Weight u1_bias, u2_bias, u_bias;
  Weight v11, v12, v21, v22, v;
  Weight b1, b2, b;
};

struct LayerWeights {
  Weight input_norm, post_norm;  // [1, d]
  Weight wq, wk, wv, wo;
  bool has_router = false;
  RouterWeights router;
  ExpertWeights experts;
};

struct ModelWeights {
  Weight embed;       // [V, d]
  Weight lm_head;     // [V, d] (the embedding when tied)
  Weight final_norm;  // [1, d]
  std::vector<LayerWeights> layers;
};

}  // namespace monet
