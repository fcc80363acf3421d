// Formulas that training and inference share, written once (docs/monet.md):
// rotary angles, the router's selection of one head row, and the loss from
// logits. Templated on the real type: float for inference and f32 training,
// double for the training reference.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace monet {

// Rotary angles of T positions: cos_t, sin_t [T, hd/2], row t for position
// pos0 + t. inv_freq_i = theta^(-2i/hd) and the angle are computed in R, as
// HF computes them in float32 for inference.
template <class R>
void rope_angles(int64_t pos0, int64_t T, int64_t hd, double theta, R* cos_t, R* sin_t) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i++) {
    const R inv_freq = R(1.0 / std::pow(theta, double(2 * i) / double(hd)));
    for (int64_t t = 0; t < T; t++) {
      const R angle = R(pos0 + t) * inv_freq;
      cos_t[t * half + i] = std::cos(angle);
      sin_t[t * half + i] = std::sin(angle);
    }
  }
}

// The largest of v[0..n) (-inf for n = 0; no NaN expected), in lanes of
// maxima so that the loop vectorizes (a single running maximum is a chain of
// dependent comparisons).
template <class R>
R max_value(const R* v, int64_t n) {
  constexpr int64_t kLanes = 16;
  R lane_max[kLanes];
  for (int64_t j = 0; j < kLanes; j++) lane_max[j] = -std::numeric_limits<R>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; j++) lane_max[j] = v[i + j] > lane_max[j] ? v[i + j] : lane_max[j];
  R m = -std::numeric_limits<R>::infinity();
  for (; i < n; i++) m = v[i] > m ? v[i] : m;
  for (int64_t j = 0; j < kLanes; j++) m = lane_max[j] > m ? lane_max[j] : m;
  return m;
}

// The router's selection for one head: given raw logits z[E] and the
// BatchNorm statistics of this head (mean, 1/sqrt(var + eps)), keep every
// entry whose normalised score n_i = (z_i - mean) * inv_std reaches
// min(max_i n_i, sigma) (so the top entry always passes), and write the
// softmax of the raw logits over the kept entries into g (0 elsewhere; g
// must not be z).
// The normalisation is computed in N (float at inference, as HF's float32
// BatchNorm; double in training), the softmax sum in double.
template <class R, class N>
void router_select_row(const R* z, int64_t E, N mean, N inv_std, N sigma, R* g) {
  // The largest logit has the largest score ((z - mean) * inv_std rounds
  // monotonically for inv_std > 0) and always passes: max_n and the softmax's
  // max_z both come from max_i z_i.
  const R max_z = max_value(z, E);
  const N cut = std::min((N(max_z) - mean) * inv_std, sigma);
  // The kept entries are few: zeros everywhere, then exp over the kept ones
  // (the double sum in index order, as over every entry with zeros).
  double sum = 0.0;
  for (int64_t i = 0; i < E; i++) g[i] = R(0);
  for (int64_t i = 0; i < E; i++)
    if ((N(z[i]) - mean) * inv_std >= cut) {
      g[i] = R(std::exp(z[i] - max_z));
      sum += double(g[i]);
    }
  const R inv = R(1.0 / sum);
  for (int64_t i = 0; i < E; i++) g[i] *= inv;
}

// router_select_row's selection where only the `count` entries `marked`
// (increasing indices) may pass and the others would be -inf: the largest
// logit and every kept one are among them, so g is the same bit for bit
// (the same maximum, cut, comparisons and double sum in index order),
// without a pass over every logit (the CPU backend's bounded routers).
// marked must not alias g.
template <class R, class N>
void router_select_marked(const R* z, const int32_t* marked, int64_t count, int64_t E, N mean, N inv_std, N sigma,
                          R* g) {
  R max_z = -std::numeric_limits<R>::infinity();
  for (int64_t i = 0; i < count; i++) max_z = std::max(max_z, z[marked[i]]);
  const N cut = std::min((N(max_z) - mean) * inv_std, sigma);
  double sum = 0.0;
  for (int64_t i = 0; i < E; i++) g[i] = R(0);
  for (int64_t i = 0; i < count; i++) {
    const int32_t e = marked[i];
    if ((N(z[e]) - mean) * inv_std >= cut) {
      g[e] = R(std::exp(z[e] - max_z));
      sum += double(g[e]);
    }
  }
  const R inv = R(1.0 / sum);
  for (int64_t i = 0; i < count; i++) g[marked[i]] *= inv;
}

// log(sum_v exp(x_v)) of a row, computed stably.
template <class R>
double log_sum_exp(const R* x, int64_t n) {
  const R mx = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int64_t v = 0; v < n; v++) sum += std::exp(double(x[v]) - double(mx));
  return std::log(sum) + double(mx);
}

// Next-token loss from logits: -log_softmax(x)[target], as log-sum-exp minus
// the target's logit (never the log of an exponentiated probability).
template <class R>
double nll_from_logits(const R* logits, int64_t vocab, int64_t target) {
  return log_sum_exp(logits, vocab) - double(logits[target]);
}

}  // namespace monet
