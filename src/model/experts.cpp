#include "model/experts.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "backend/cpu/ops.h"

namespace monet {
namespace {

// Experts a token's router kept on one side: indices i with sum_h g[h,i] > 0.
struct SideRoute {
  std::vector<int32_t> idx;   // [n] expert indices
  std::vector<float> total;   // [n] a[i] = sum_h g[h,i]
  std::vector<float> head;    // [n, H] g[h, idx[a]]
};

SideRoute route_side(const float* g, int64_t H, int64_t E) {
  SideRoute r;
  for (int64_t i = 0; i < E; i++) {
    float a = 0.0f;
    for (int64_t h = 0; h < H; h++) a += g[h * E + i];
    if (a > 0.0f) {
      r.idx.push_back(int32_t(i));
      r.total.push_back(a);
      for (int64_t h = 0; h < H; h++) r.head.push_back(g[h * E + i]);
    }
  }
  return r;
}

// x[a, :] = relu2(u[idx[a]*w : idx[a]*w + w, :] . y + bias)   for each kept expert a
void expert_inputs(const Weight& u, const std::vector<float>& bias, const SideRoute& r, int64_t w,
                   const float* y, float* x) {
  const int64_t n = int64_t(r.idx.size());
#pragma omp parallel for schedule(static)
  for (int64_t a = 0; a < n; a++) {
    const int64_t row0 = int64_t(r.idx[a]) * w;
    float* xa = x + a * w;
    cpu::dot_rows(u, row0, w, y, xa);
    for (int64_t c = 0; c < w; c++) xa[c] += bias[row0 + c];
    cpu::relu2(xa, w);
  }
}

// p[h, :] = sum_a g[h, idx[a]] x[a, :]
void head_mix(const SideRoute& r, int64_t H, int64_t w, const float* x, float* p) {
  std::fill(p, p + H * w, 0.0f);
  for (size_t a = 0; a < r.idx.size(); a++)
    for (int64_t h = 0; h < H; h++) {
      const float gh = r.head[a * H + h];
      if (gh == 0.0f) continue;
      for (int64_t c = 0; c < w; c++) p[h * w + c] += gh * x[a * w + c];
    }
}

// q[a, :] = sum_h g[h, idx[a]] p[h, :]
void head_spread(const SideRoute& r, int64_t H, int64_t w, const float* p, float* q) {
  for (size_t a = 0; a < r.idx.size(); a++) {
    float* qa = q + a * w;
    std::fill(qa, qa + w, 0.0f);
    for (int64_t h = 0; h < H; h++) {
      const float gh = r.head[a * H + h];
      if (gh == 0.0f) continue;
      for (int64_t c = 0; c < w; c++) qa[c] += gh * p[h * w + c];
    }
  }
}

// One output projection term over the kept experts, written into out[c0, c1):
// out += sum_a v^T[idx[a]*w .. +w, :]^T in[a]  (+ sum_a total[a] * b[idx[a], :])
struct ProjTerm {
  const Weight* v;
  const SideRoute* route;
  const float* in;  // [n, w]
};

void project_sparse(const ProjTerm* terms, int n_terms, const Weight* bias, const SideRoute* bias_route,
                    const float* bias_coef, int64_t w, float* out, int64_t N) {
  std::fill(out, out + N, 0.0f);
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    // Column ranges in multiples of 16 floats: whole vectors per thread.
    const int64_t chunk = ((N + nt - 1) / nt + 15) / 16 * 16;
    const int64_t c0 = std::min(N, tid * chunk), c1 = std::min(N, c0 + chunk);
    if (c0 < c1) {
      for (int k = 0; k < n_terms; k++) {
        const ProjTerm& t = terms[k];
        for (size_t a = 0; a < t.route->idx.size(); a++)
          cpu::axpy_rows(*t.v, int64_t(t.route->idx[a]) * w, w, t.in + a * w, out, c0, c1);
      }
      for (size_t a = 0; a < bias_route->idx.size(); a++)
        cpu::axpy_rows(*bias, bias_route->idx[a], 1, &bias_coef[a], out, c0, c1);
    }
  }
}

// The factorised mix of one token, over the experts its routers kept:
// VD: in11[a] = a1 x1[a], in12[a] = sum_h g1[h,a] p2[h], in21[b] = sum_h g2[h,b] p1[h],
//     in22[b] = a2 x2[b], bias1 = a1, bias2 = a2  (left/right halves of the output)
// HD: in21[b] = q[b] = sum_h g2[h,b] p[h], bias2 = a2
// A mask subtracts each removed pair's term w_ij E_ij(y), w_ij = sum_h g1[h,i] g2[h,j],
// from these coefficients, so no extra weights are read.
struct TokenMix {
  SideRoute r1, r2;
  std::vector<float> in11, in12, in21, in22;  // [n1, w] [n1, w] [n2, w] [n2, w]
  std::vector<float> bias1, bias2;            // [n1] [n2]
};

void apply_mask(const ExpertMask& mask, int64_t group, int64_t H, int64_t w, const float* x1s, const float* x2s,
                bool vd, TokenMix& mix) {
  for (size_t a = 0; a < mix.r1.idx.size(); a++)
    for (size_t b = 0; b < mix.r2.idx.size(); b++) {
      if (!mask.removed(group, mix.r1.idx[a], mix.r2.idx[b])) continue;
      float pw = 0.0f;
      for (int64_t h = 0; h < H; h++) pw += mix.r1.head[a * H + h] * mix.r2.head[b * H + h];
      if (pw == 0.0f) continue;
      const float* xi = x1s + a * w;
      for (int64_t k = 0; k < w; k++) {
        mix.in21[b * w + k] -= pw * xi[k];
        if (vd) {
          const float* xj = x2s + b * w;
          mix.in11[a * w + k] -= pw * xi[k];
          mix.in12[a * w + k] -= pw * xj[k];
          mix.in22[b * w + k] -= pw * xj[k];
        }
      }
      if (vd) mix.bias1[a] -= pw;
      mix.bias2[b] -= pw;
    }
}

// x1s [n1, w] (and x2s [n2, w] for VD): relu2(u y + bias) of the kept experts.
TokenMix token_mix(const MonetConfig& c, SideRoute r1, SideRoute r2, const float* x1s, const float* x2s,
                   const ExpertMask* mask, int64_t group) {
  const bool vd = c.moe_decompose == Decompose::Vertical;
  const int64_t H = c.moe_heads, w = vd ? c.moe_dim / 2 : c.moe_dim;
  TokenMix mix{std::move(r1), std::move(r2), {}, {}, {}, {}, {}, {}};
  const int64_t n1 = int64_t(mix.r1.idx.size()), n2 = int64_t(mix.r2.idx.size());
  std::vector<float> p1(size_t(H * w));
  head_mix(mix.r1, H, w, x1s, p1.data());
  mix.in21.resize(size_t(n2 * w));
  head_spread(mix.r2, H, w, p1.data(), mix.in21.data());
  mix.bias2 = mix.r2.total;
  if (vd) {
    std::vector<float> p2(size_t(H * w));
    head_mix(mix.r2, H, w, x2s, p2.data());
    mix.in11.resize(size_t(n1 * w));
    mix.in12.resize(size_t(n1 * w));
    mix.in22.resize(size_t(n2 * w));
    for (int64_t a = 0; a < n1; a++)
      for (int64_t k = 0; k < w; k++) mix.in11[a * w + k] = mix.r1.total[a] * x1s[a * w + k];
    head_spread(mix.r1, H, w, p2.data(), mix.in12.data());
    for (int64_t b = 0; b < n2; b++)
      for (int64_t k = 0; k < w; k++) mix.in22[b * w + k] = mix.r2.total[b] * x2s[b * w + k];
    mix.bias1 = mix.r1.total;
  }
  if (mask && !mask->group_empty(group)) apply_mask(*mask, group, H, w, x1s, x2s, vd, mix);
  return mix;
}

void token_sparse(const MonetConfig& c, const LayerWeights& lw, const float* y, const float* g1,
                  const float* g2, const ExpertMask* mask, int64_t group, float* out) {
  const bool vd = c.moe_decompose == Decompose::Vertical;
  const int64_t H = c.moe_heads, E = c.moe_experts, d = c.hidden_size;
  const int64_t w = vd ? c.moe_dim / 2 : c.moe_dim;
  SideRoute r1 = route_side(g1, H, E), r2 = route_side(g2, H, E);
  std::vector<float> x1s(r1.idx.size() * size_t(w)), x2s;
  expert_inputs(vd ? lw.u1 : lw.u, vd ? lw.u1_bias : lw.u_bias, r1, w, y, x1s.data());
  if (vd) {
    x2s.resize(r2.idx.size() * size_t(w));
    expert_inputs(lw.u2, lw.u2_bias, r2, w, y, x2s.data());
  }
  const TokenMix mix = token_mix(c, std::move(r1), std::move(r2), x1s.data(), x2s.data(), mask, group);
  if (vd) {
    const ProjTerm left[2] = {{&lw.v11, &mix.r1, mix.in11.data()}, {&lw.v12, &mix.r1, mix.in12.data()}};
    const ProjTerm right[2] = {{&lw.v21, &mix.r2, mix.in21.data()}, {&lw.v22, &mix.r2, mix.in22.data()}};
    project_sparse(left, 2, &lw.b1, &mix.r1, mix.bias1.data(), w, out, d / 2);
    project_sparse(right, 2, &lw.b2, &mix.r2, mix.bias2.data(), w, out + d / 2, d / 2);
  } else {
    const ProjTerm term = {&lw.v, &mix.r2, mix.in21.data()};
    project_sparse(&term, 1, &lw.b, &mix.r2, mix.bias2.data(), w, out, d);
  }
}

// Dense: x [T, E*w] for all experts from one GEMM; the per-expert mixing
// coefficients are scattered into [T, E*w] matrices (zero where not kept)
// and projected with GEMMs.
void dense_all(const MonetConfig& c, const LayerWeights& lw, const float* y, const float* g1, const float* g2,
               int64_t T, const ExpertMask* mask, int64_t group, float* out) {
  const bool vd = c.moe_decompose == Decompose::Vertical;
  const int64_t H = c.moe_heads, E = c.moe_experts, d = c.hidden_size;
  const int64_t w = vd ? c.moe_dim / 2 : c.moe_dim, Ew = E * w;
  std::vector<float> x1(size_t(T * Ew)), x2;
  cpu::linear(vd ? lw.u1 : lw.u, y, T, x1.data(), vd ? lw.u1_bias.data() : lw.u_bias.data());
  cpu::relu2(x1.data(), T * Ew);
  if (vd) {
    x2.resize(size_t(T * Ew));
    cpu::linear(lw.u2, y, T, x2.data(), lw.u2_bias.data());
    cpu::relu2(x2.data(), T * Ew);
  }
  std::vector<float> in11, in12, in22, bias1;
  std::vector<float> in21(size_t(T * Ew), 0.0f), bias2(size_t(T * E), 0.0f);
  if (vd) {
    in11.assign(size_t(T * Ew), 0.0f);
    in12.assign(size_t(T * Ew), 0.0f);
    in22.assign(size_t(T * Ew), 0.0f);
    bias1.assign(size_t(T * E), 0.0f);
  }
  auto gather = [w](const std::vector<float>& x, int64_t row, const SideRoute& r) {
    std::vector<float> xs(r.idx.size() * size_t(w));
    for (size_t a = 0; a < r.idx.size(); a++) std::copy_n(x.data() + row + r.idx[a] * w, w, xs.data() + a * w);
    return xs;
  };
  auto scatter = [w](const std::vector<float>& src, const SideRoute& r, float* dst) {
    for (size_t a = 0; a < r.idx.size(); a++) std::copy_n(src.data() + a * w, w, dst + r.idx[a] * w);
  };
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; t++) {
    SideRoute r1 = route_side(g1 + t * H * E, H, E), r2 = route_side(g2 + t * H * E, H, E);
    const std::vector<float> x1s = gather(x1, t * Ew, r1);
    const std::vector<float> x2s = vd ? gather(x2, t * Ew, r2) : std::vector<float>();
    const TokenMix mix = token_mix(c, std::move(r1), std::move(r2), x1s.data(), x2s.data(), mask, group);
    scatter(mix.in21, mix.r2, in21.data() + t * Ew);
    for (size_t b = 0; b < mix.r2.idx.size(); b++) bias2[size_t(t * E + mix.r2.idx[b])] = mix.bias2[b];
    if (vd) {
      scatter(mix.in11, mix.r1, in11.data() + t * Ew);
      scatter(mix.in12, mix.r1, in12.data() + t * Ew);
      scatter(mix.in22, mix.r2, in22.data() + t * Ew);
      for (size_t a = 0; a < mix.r1.idx.size(); a++) bias1[size_t(t * E + mix.r1.idx[a])] = mix.bias1[a];
    }
  }
  if (!vd) {
    cpu::matmul_nn(in21.data(), T, lw.v, out, false);
    cpu::matmul_nn(bias2.data(), T, lw.b, out, true);
    return;
  }
  const int64_t d2 = d / 2;
  std::vector<float> half(size_t(T * d2));
  cpu::matmul_nn(in11.data(), T, lw.v11, half.data(), false);
  cpu::matmul_nn(in12.data(), T, lw.v12, half.data(), true);
  cpu::matmul_nn(bias1.data(), T, lw.b1, half.data(), true);
  for (int64_t t = 0; t < T; t++) std::copy_n(half.data() + t * d2, d2, out + t * d);
  cpu::matmul_nn(in21.data(), T, lw.v21, half.data(), false);
  cpu::matmul_nn(in22.data(), T, lw.v22, half.data(), true);
  cpu::matmul_nn(bias2.data(), T, lw.b2, half.data(), true);
  for (int64_t t = 0; t < T; t++) std::copy_n(half.data() + t * d2, d2, out + t * d + d2);
}

}  // namespace

void experts_forward(const MonetConfig& c, const LayerWeights& lw, const float* y, const float* g1,
                     const float* g2, int64_t T, bool dense, const ExpertMask* mask, int64_t group, float* out) {
  if (dense) {
    dense_all(c, lw, y, g1, g2, T, mask, group, out);
    return;
  }
  const int64_t d = c.hidden_size, HE = c.moe_heads * c.moe_experts;
  for (int64_t t = 0; t < T; t++) token_sparse(c, lw, y + t * d, g1 + t * HE, g2 + t * HE, mask, group, out + t * d);
}

}  // namespace monet
