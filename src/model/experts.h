// The Monet expert mix (VD and HD), given router probabilities g1, g2.
#pragma once
#include <cstdint>

#include "monet/mask.h"
#include "monet/model.h"

namespace monet {

// y [T, d] post-attention-norm activations; g1, g2 [T, H, E] router
// probabilities; out [T, d] receives the expert mix (overwritten).
// dense: one GEMM pass over all expert weights (prefill); otherwise each token
// reads only the expert slices its routers selected (decode). mask (may be
// null) removes experts of router group `group`.
void experts_forward(const MonetConfig& c, const LayerWeights& lw, const float* y, const float* g1,
                     const float* g2, int64_t T, bool dense, const ExpertMask* mask, int64_t group, float* out);

}  // namespace monet
