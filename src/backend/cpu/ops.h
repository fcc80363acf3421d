// CPU kernels of the Monet forward pass. This is the seam a device backend
// mirrors: every op here has a per-op test, and a CUDA op is checked against
// its CPU twin. All activations are float32; weights are F32 or BF16 (widened
// to float32 inside the kernels). Threads come from the OpenMP pool.
#pragma once
#include <cstdint>
#include <vector>

#include "monet/model.h"

namespace monet::cpu {

// y[T, w.rows] = x[T, w.cols] . w^T (+ bias[w.rows])
void linear(const Weight& w, const float* x, int64_t T, float* y, const float* bias = nullptr);

// y[T, w.cols] (+)= x[T, w.rows] . w   (w used as a [K, N] matrix)
void matmul_nn(const float* x, int64_t T, const Weight& w, float* y, bool accumulate);

// y[r] = w[row0 + r, :] . x   for r in [0, nrows)
void dot_rows(const Weight& w, int64_t row0, int64_t nrows, const float* x, float* y);

// out[c] += sum_r coef[r] * w[row0 + r, c]  over columns [c0, c1)
void axpy_rows(const Weight& w, int64_t row0, int64_t nrows, const float* coef, float* out,
               int64_t c0, int64_t c1);

// y[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), float32 as the reference
void rmsnorm(const float* x, const float* w, int64_t T, int64_t d, double eps, float* y);

// Rotary angles of positions pos0 .. pos0+T-1: cos_t, sin_t [T, hd/2]
// (inv_freq and angle in float32, as HF computes them).
void rope_table(int64_t T, int64_t hd, int64_t pos0, double theta, std::vector<float>& cos_t, std::vector<float>& sin_t);

// Rotary embedding (rotate_half pairs (i, i+hd/2)) in place on x[T, n_heads*hd]
// with the angles of rope_table.
void rope(float* x, int64_t T, int64_t n_heads, int64_t hd, const float* cos_t, const float* sin_t);

// Causal attention of T new queries at positions pos0.. over the cache
// k/v [pos0+T, nkv*hd]; q, out: [T, nh*hd]. GQA: q head h reads kv head h/(nh/nkv).
void attention(const float* q, const float* k, const float* v, int64_t pos0, int64_t T,
               int64_t nh, int64_t nkv, int64_t hd, float* out);

// Router head-wise selection: z [T, H, E] raw logits -> g [T, H, E]
// probabilities (BatchNorm with running stats, threshold min(max n, sigma),
// softmax of the raw logits over the kept entries). Computed in float64 inside
// a row for the softmax sum; inputs/outputs float32.
void router_select(const float* z, const float* mean, const float* var, int64_t T, int64_t H,
                   int64_t E, double sigma, float* g);

// relu(x)^2 in place
void relu2(float* x, int64_t n);

// Convert n elements of an F32/BF16 buffer to float32.
void widen(const Weight& w, int64_t offset, int64_t n, float* out);

}  // namespace monet::cpu
