#include <algorithm>

#include "backend/backend.h"
#include "monet/error.h"

#include "monet/interp.h"

namespace monet {

void active_experts(const float* g1, const float* g2, int64_t H, int64_t E, float threshold,
                    std::vector<ExpertActivation>& out) {
  // Reused by the calling thread: the index calls this for every token.
  struct Scratch {
    std::vector<uint8_t> on1, on2;
    std::vector<int32_t> s1, s2;
    std::vector<float> a1, a2, p;
  };
  static thread_local Scratch sc;
  // The experts any head keeps, head by head (contiguous rows: vectorized).
  sc.on1.assign(size_t(E), 0);
  sc.on2.assign(size_t(E), 0);
  uint8_t* on1 = sc.on1.data();
  uint8_t* on2 = sc.on2.data();
  for (int64_t h = 0; h < H; h++) {
    const float* r1 = g1 + h * E;
    const float* r2 = g2 + h * E;
    for (int64_t i = 0; i < E; i++) {
      on1[i] |= uint8_t(r1[i] > 0.0f);
      on2[i] |= uint8_t(r2[i] > 0.0f);
    }
  }
  sc.s1.clear();
  sc.s2.clear();
  for (int64_t i = 0; i < E; i++) {
    if (on1[i]) sc.s1.push_back(int32_t(i));
    if (on2[i]) sc.s2.push_back(int32_t(i));
  }
  // The kept experts' probabilities gathered head by head, so that a pair's
  // sum over the heads runs over contiguous j (vectorized; each pair's sum
  // still adds its heads in order from 0).
  const size_t n1 = sc.s1.size(), n2 = sc.s2.size();
  sc.a1.resize(size_t(H) * n1);
  sc.a2.resize(size_t(H) * n2);
  sc.p.resize(n2);
  for (int64_t h = 0; h < H; h++) {
    for (size_t a = 0; a < n1; a++) sc.a1[size_t(h) * n1 + a] = g1[h * E + sc.s1[a]];
    for (size_t b = 0; b < n2; b++) sc.a2[size_t(h) * n2 + b] = g2[h * E + sc.s2[b]];
  }
  out.clear();
  float* p = sc.p.data();
  for (size_t a = 0; a < n1; a++) {
    std::fill(p, p + n2, 0.0f);
    for (int64_t h = 0; h < H; h++) {
      const float x = sc.a1[size_t(h) * n1 + a];
      const float* y = sc.a2.data() + size_t(h) * n2;
      for (size_t b = 0; b < n2; b++) p[b] += x * y[b];
    }
    const int32_t i = sc.s1[a];
    for (size_t b = 0; b < n2; b++)
      if (p[b] > threshold) out.push_back({int64_t(i) * E + sc.s2[b], i, sc.s2[b], p[b]});
  }
}

std::vector<ExpertActivation> active_experts(const float* g1, const float* g2, int64_t H, int64_t E,
                                             float threshold, bool sorted) {
  std::vector<ExpertActivation> out;
  active_experts(g1, g2, H, E, threshold, out);
  if (sorted)
    std::sort(out.begin(), out.end(), [](const ExpertActivation& a, const ExpertActivation& b) {
    return a.prob > b.prob || (a.prob == b.prob && a.id < b.id);
  });
  return out;
}

TokenExperts token_experts(const RouterCapture& cap, size_t t, size_t g, int64_t H, int64_t E, float threshold,
                           const ExpertMask* mask) {
  const size_t HE = size_t(H * E);
  TokenExperts out;
  for (const ExpertActivation& a : active_experts(cap.g1[g].data() + t * HE, cap.g2[g].data() + t * HE, H, E, threshold))
    (mask && mask->removed(int64_t(g), a.i, a.j) ? out.removed : out.kept).push_back(a);
  return out;
}

std::vector<float> expert_output_logits(const Model& model, int64_t group, int64_t id) {
  const MonetConfig& c = model.config();
  const int64_t E = c.moe_experts, d = c.hidden_size;
  if (group < 0 || group >= c.num_router_layers()) fail("router group ", group, " is outside [0, ", c.num_router_layers(), ")");
  if (id < 0 || id >= E * E) fail("expert ", id, " is outside [0, ", E * E, ")");
  const int64_t i = id / E, j = id % E;
  Backend& be = model.backend();
  std::vector<float> dir(static_cast<size_t>(d), 0.0f);
  // dir[col0 ..] += sum of rows [row0, row0 + n) of w (one expert's slice of a v matrix)
  auto add_rows = [&](const Weight& w, int64_t row0, int64_t n, int64_t col0) {
    std::vector<int32_t> rows(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; r++) rows[size_t(r)] = int32_t(row0 + r);
    const size_t bytes = size_t(n * w.cols) * sizeof(float);
    Buffer buf = be.alloc(bytes);
    be.embed(w, rows.data(), n, buf.f32());
    std::vector<float> host(size_t(n * w.cols));
    be.to_host(host.data(), buf.data(), bytes);
    for (int64_t r = 0; r < n; r++)
      for (int64_t k = 0; k < w.cols; k++) dir[size_t(col0 + k)] += host[size_t(r * w.cols + k)];
  };
  for (int64_t l = group * c.moe_groups; l < std::min(c.num_hidden_layers, (group + 1) * c.moe_groups); l++) {
    const ExpertWeights& ew = model.weights().layers[size_t(l)].experts;
    if (c.moe_decompose == Decompose::Vertical) {
      const int64_t w = c.moe_dim / 2;
      add_rows(ew.v11, i * w, w, 0);
      add_rows(ew.v12, i * w, w, 0);
      add_rows(ew.v21, j * w, w, d / 2);
      add_rows(ew.v22, j * w, w, d / 2);
    } else {
      add_rows(ew.v, j * c.moe_dim, c.moe_dim, 0);
    }
  }
  // Through the final norm's weights (the direction, not a normalised state) and lm_head.
  std::vector<float> norm(static_cast<size_t>(d));
  {
    Buffer buf = be.alloc(size_t(d) * sizeof(float));
    const int32_t row0 = 0;
    be.embed(model.weights().final_norm, &row0, 1, buf.f32());
    be.to_host(norm.data(), buf.data(), size_t(d) * sizeof(float));
  }
  for (int64_t k = 0; k < d; k++) dir[size_t(k)] *= norm[size_t(k)];
  Buffer x = be.alloc(size_t(d) * sizeof(float)), y = be.alloc(size_t(c.vocab_size) * sizeof(float));
  be.from_host(x.data(), dir.data(), size_t(d) * sizeof(float));
  be.linear(model.weights().lm_head, x.f32(), 1, y.f32());
  std::vector<float> logits(size_t(c.vocab_size));
  be.to_host(logits.data(), y.data(), logits.size() * sizeof(float));
  return logits;
}

}  // namespace monet
