// Per-op tests of the CPU kernels against plain double-precision loops.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "backend/cpu/ops.h"
#include "model/experts.h"
#include "monet/mask.h"

namespace {

using monet::DType;
using monet::Weight;

struct RandomWeight {
  std::vector<float> f32;      // the values the weight holds
  std::vector<uint16_t> bits;  // BF16 storage when dtype is BF16
  Weight w;
};

RandomWeight random_weight(int64_t rows, int64_t cols, DType dtype, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  RandomWeight r;
  r.f32.resize(size_t(rows * cols));
  for (float& v : r.f32) v = nd(rng);
  r.w.dtype = dtype;
  r.w.rows = rows;
  r.w.cols = cols;
  if (dtype == DType::BF16) {
    r.bits.resize(r.f32.size());
    for (size_t i = 0; i < r.f32.size(); i++) {
      r.bits[i] = monet::f32_to_bf16(r.f32[i]);
      r.f32[i] = monet::bf16_to_f32(r.bits[i]);
    }
    r.w.data = r.bits.data();
  } else {
    r.w.data = r.f32.data();
  }
  return r;
}

std::vector<float> random_vec(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); i++) {
    num = std::max(num, std::abs(double(got[i]) - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / std::max(den, 1e-30);
}

class LinearTest : public ::testing::TestWithParam<std::tuple<DType, int64_t>> {};

TEST_P(LinearTest, MatchesDoubleLoop) {
  auto [dtype, T] = GetParam();
  std::mt19937 rng(42);
  const int64_t N = 37, K = 70;  // odd sizes exercise the vector tails
  RandomWeight w = random_weight(N, K, dtype, rng);
  std::vector<float> x = random_vec(size_t(T * K), rng), bias = random_vec(size_t(N), rng);
  std::vector<float> y(size_t(T * N));
  monet::cpu::linear(w.w, x.data(), T, y.data(), bias.data());
  std::vector<double> want(size_t(T * N));
  for (int64_t t = 0; t < T; t++)
    for (int64_t n = 0; n < N; n++) {
      double s = bias[size_t(n)];
      for (int64_t k = 0; k < K; k++) s += double(w.f32[size_t(n * K + k)]) * x[size_t(t * K + k)];
      want[size_t(t * N + n)] = s;
    }
  EXPECT_LT(max_rel_err(y, want), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Ops, LinearTest,
                         ::testing::Combine(::testing::Values(DType::F32, DType::BF16),
                                            ::testing::Values(1, 3, 8, 9, 40)));

TEST(Ops, MatmulNnMatchesDoubleLoop) {
  std::mt19937 rng(1);
  for (DType dtype : {DType::F32, DType::BF16}) {
    const int64_t T = 11, K = 50, N = 33;
    RandomWeight w = random_weight(K, N, dtype, rng);
    std::vector<float> x = random_vec(size_t(T * K), rng), y = random_vec(size_t(T * N), rng);
    std::vector<double> want(y.begin(), y.end());
    for (int64_t t = 0; t < T; t++)
      for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) want[size_t(t * N + n)] += double(x[size_t(t * K + k)]) * w.f32[size_t(k * N + n)];
    monet::cpu::matmul_nn(x.data(), T, w.w, y.data(), /*accumulate=*/true);
    EXPECT_LT(max_rel_err(y, want), 1e-5);
  }
}

TEST(Ops, AxpyRowsAndDotRows) {
  std::mt19937 rng(2);
  RandomWeight w = random_weight(20, 45, DType::BF16, rng);
  std::vector<float> coef = random_vec(4, rng), out(45, 0.0f);
  monet::cpu::axpy_rows(w.w, 5, 4, coef.data(), out.data(), 3, 40);
  for (int64_t c = 0; c < 45; c++) {
    double want = 0;
    if (c >= 3 && c < 40)
      for (int64_t r = 0; r < 4; r++) want += double(coef[size_t(r)]) * w.f32[size_t((5 + r) * 45 + c)];
    EXPECT_NEAR(out[size_t(c)], want, 1e-5) << c;
  }
  std::vector<float> x = random_vec(45, rng), y(3);
  monet::cpu::dot_rows(w.w, 7, 3, x.data(), y.data());
  for (int64_t r = 0; r < 3; r++) {
    double want = 0;
    for (int64_t c = 0; c < 45; c++) want += double(w.f32[size_t((7 + r) * 45 + c)]) * x[size_t(c)];
    EXPECT_NEAR(y[size_t(r)], want, 1e-4);
  }
}

TEST(Ops, RmsNorm) {
  std::mt19937 rng(3);
  const int64_t T = 3, d = 19;
  std::vector<float> x = random_vec(size_t(T * d), rng), w = random_vec(size_t(d), rng), y(size_t(T * d));
  monet::cpu::rmsnorm(x.data(), w.data(), T, d, 1e-6, y.data());
  for (int64_t t = 0; t < T; t++) {
    double ss = 0;
    for (int64_t i = 0; i < d; i++) ss += double(x[size_t(t * d + i)]) * x[size_t(t * d + i)];
    const double inv = 1.0 / std::sqrt(ss / d + 1e-6);
    for (int64_t i = 0; i < d; i++) EXPECT_NEAR(y[size_t(t * d + i)], w[size_t(i)] * x[size_t(t * d + i)] * inv, 1e-5);
  }
}

TEST(Ops, RopeRotatesHalfPairs) {
  // Two tokens at positions 5 and 6, two heads each.
  const int64_t hd = 8, pos0 = 5, T = 2, heads = 2;
  std::vector<float> x(size_t(T * heads * hd));
  for (size_t k = 0; k < x.size(); k++) x[k] = float(k % 7) - 2.5f;
  std::vector<float> y = x, cos_t, sin_t;
  monet::cpu::rope_table(T, hd, pos0, 10000.0, cos_t, sin_t);
  ASSERT_EQ(cos_t.size(), size_t(T * hd / 2));
  monet::cpu::rope(y.data(), T, heads, hd, cos_t.data(), sin_t.data());
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < heads; h++)
      for (int64_t i = 0; i < hd / 2; i++) {
        const double f = std::pow(10000.0, -2.0 * double(i) / hd), a = double(pos0 + t) * f;
        const size_t lo = size_t((t * heads + h) * hd + i), hi = lo + size_t(hd / 2);
        EXPECT_NEAR(y[lo], x[lo] * std::cos(a) - x[hi] * std::sin(a), 1e-5);
        EXPECT_NEAR(y[hi], x[hi] * std::cos(a) + x[lo] * std::sin(a), 1e-5);
      }
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<int64_t, int64_t>> {};

// Decode-sized batches take the per-query loop, prefill-sized ones the GEMM path.
TEST_P(AttentionTest, CausalGqa) {
  std::mt19937 rng(4);
  auto [pos0, T] = GetParam();
  const int64_t nh = 4, nkv = 2, hd = 6, P = pos0 + T;
  std::vector<float> q = random_vec(size_t(T * nh * hd), rng), k = random_vec(size_t(P * nkv * hd), rng),
                     v = random_vec(size_t(P * nkv * hd), rng), out(size_t(T * nh * hd));
  monet::cpu::attention(q.data(), k.data(), v.data(), pos0, T, nh, nkv, hd, out.data());
  std::vector<double> want(out.size());
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < nh; h++) {
      const int64_t g = h / (nh / nkv), n = pos0 + t + 1;
      std::vector<double> s(static_cast<size_t>(n));
      double mx = -1e300, sum = 0;
      for (int64_t p = 0; p < n; p++) {
        double dot = 0;
        for (int64_t i = 0; i < hd; i++) dot += double(q[size_t((t * nh + h) * hd + i)]) * k[size_t((p * nkv + g) * hd + i)];
        s[size_t(p)] = dot / std::sqrt(double(hd));
        mx = std::max(mx, s[size_t(p)]);
      }
      for (auto& e : s) sum += (e = std::exp(e - mx));
      for (int64_t i = 0; i < hd; i++) {
        double o = 0;
        for (int64_t p = 0; p < n; p++) o += s[size_t(p)] / sum * v[size_t((p * nkv + g) * hd + i)];
        want[size_t((t * nh + h) * hd + i)] = o;
      }
    }
  EXPECT_LT(max_rel_err(out, want), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Ops, AttentionTest,
                         ::testing::Values(std::make_tuple(3, 4), std::make_tuple(0, 1), std::make_tuple(0, 20),
                                           std::make_tuple(5, 13)));

TEST(Ops, RouterSelectKeepsEntriesAboveThreshold) {
  std::mt19937 rng(5);
  const int64_t T = 6, H = 3, E = 64;
  const double sigma = 1.5;
  std::vector<float> z = random_vec(size_t(T * H * E), rng, 2.0f), g(z.size());
  std::vector<float> mean = {0.1f, -0.2f, 0.0f}, var = {4.0f, 3.5f, 5.0f};
  monet::cpu::router_select(z.data(), mean.data(), var.data(), T, H, E, sigma, g.data());
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      const float* zr = &z[size_t((t * H + h) * E)];
      const float* gr = &g[size_t((t * H + h) * E)];
      double max_n = -1e300;
      for (int64_t i = 0; i < E; i++) max_n = std::max(max_n, (zr[i] - mean[size_t(h)]) / std::sqrt(var[size_t(h)] + 1e-5));
      const double cut = std::min(max_n, sigma);
      double denom = 0;
      for (int64_t i = 0; i < E; i++)
        if ((zr[i] - mean[size_t(h)]) / std::sqrt(var[size_t(h)] + 1e-5) >= cut) denom += std::exp(double(zr[i]));
      int kept = 0;
      for (int64_t i = 0; i < E; i++) {
        const bool keep = (zr[i] - mean[size_t(h)]) / std::sqrt(var[size_t(h)] + 1e-5) >= cut;
        kept += keep;
        EXPECT_NEAR(gr[i], keep ? std::exp(double(zr[i])) / denom : 0.0, 1e-6);
      }
      EXPECT_GE(kept, 1);
    }
}

// Biases of the expert inputs of the current ExpertPathsTest (u1/u, u2).
std::vector<float> g_bias1, g_bias2;

// out[t] = sum_h sum_{i,j} M[i,j] g1[h,i] g2[h,j] E_ij(y[t]), the composed
// experts summed one by one (spec: "Experts as sums over composed experts").
// `w` holds the weights in the order the test made them (HF layouts
// transposed for v as the loader stores them).
std::vector<double> explicit_sum(const monet::MonetConfig& c, const std::vector<RandomWeight>& w,
                                 const std::vector<float>& y, const std::vector<float>& g1,
                                 const std::vector<float>& g2, int64_t T, const monet::ExpertMask* mask) {
  const bool vd = c.moe_decompose == monet::Decompose::Vertical;
  const int64_t d = c.hidden_size, H = c.moe_heads, E = c.moe_experts, m = c.moe_dim;
  const int64_t hw = vd ? m / 2 : m;  // expert slice width per side
  std::vector<double> out(size_t(T * d), 0.0);
  auto relu2 = [](double v) { return v > 0 ? v * v : 0.0; };
  // x[side][i][k]: relu2(u_side[i*hw+k] . y + bias); biases live in the test's vectors
  for (int64_t t = 0; t < T; t++) {
    const float* yt = &y[size_t(t * d)];
    auto expert_in = [&](const RandomWeight& u, const std::vector<float>& bias, int64_t i) {
      std::vector<double> x(static_cast<size_t>(hw));
      for (int64_t k = 0; k < hw; k++) {
        double s = bias[size_t(i * hw + k)];
        for (int64_t e = 0; e < d; e++) s += double(u.f32[size_t((i * hw + k) * d + e)]) * yt[e];
        x[size_t(k)] = relu2(s);
      }
      return x;
    };
    for (int64_t i = 0; i < E; i++)
      for (int64_t j = 0; j < E; j++) {
        double pw = 0;
        for (int64_t h = 0; h < H; h++) pw += double(g1[size_t((t * H + h) * E + i)]) * g2[size_t((t * H + h) * E + j)];
        if (pw == 0 || (mask && mask->removed(0, i, j))) continue;
        // v^T slice: rows i*hw.. of the [E*hw, cols] matrix
        auto proj = [&](const RandomWeight& vt, int64_t e, const std::vector<double>& x, int64_t col) {
          double s = 0;
          for (int64_t k = 0; k < hw; k++) s += vt.f32[size_t((e * hw + k) * vt.w.cols + col)] * x[size_t(k)];
          return s;
        };
        if (vd) {
          const std::vector<double> xi = expert_in(w[0], g_bias1, i), xj = expert_in(w[1], g_bias2, j);
          for (int64_t col = 0; col < d / 2; col++) {
            out[size_t(t * d + col)] += pw * (proj(w[2], i, xi, col) + proj(w[3], i, xj, col) + w[6].f32[size_t(i * d / 2 + col)]);
            out[size_t(t * d + d / 2 + col)] += pw * (proj(w[4], j, xi, col) + proj(w[5], j, xj, col) + w[7].f32[size_t(j * d / 2 + col)]);
          }
        } else {
          const std::vector<double> xi = expert_in(w[0], g_bias1, i);
          for (int64_t col = 0; col < d; col++)
            out[size_t(t * d + col)] += pw * (proj(w[1], j, xi, col) + w[2].f32[size_t(j * d + col)]);
        }
      }
  }
  return out;
}

// The sparse (decode) and dense (prefill) expert paths compute the same sum,
// with and without a mask, as the explicit sum over composed experts.
class ExpertPathsTest : public ::testing::TestWithParam<std::tuple<monet::Decompose, DType>> {};

TEST_P(ExpertPathsTest, SparseEqualsDense) {
  auto [decompose, dtype] = GetParam();
  std::mt19937 rng(6);
  monet::MonetConfig c;
  c.hidden_size = 32;
  c.moe_experts = 24;
  c.moe_heads = 3;
  c.moe_dim = 6;
  c.moe_decompose = decompose;
  const int64_t T = 5, d = c.hidden_size, H = c.moe_heads, E = c.moe_experts, m = c.moe_dim;
  std::vector<RandomWeight> keep;
  monet::LayerWeights lw;
  auto make = [&](int64_t r, int64_t cc) {
    keep.push_back(random_weight(r, cc, dtype, rng, 0.3f));
    return keep.back().w;
  };
  keep.reserve(16);
  if (decompose == monet::Decompose::Vertical) {
    lw.u1 = make(E * m / 2, d);
    lw.u2 = make(E * m / 2, d);
    lw.u1_bias = g_bias1 = random_vec(size_t(E * m / 2), rng, 0.1f);
    lw.u2_bias = g_bias2 = random_vec(size_t(E * m / 2), rng, 0.1f);
    lw.v11 = make(E * m / 2, d / 2);
    lw.v12 = make(E * m / 2, d / 2);
    lw.v21 = make(E * m / 2, d / 2);
    lw.v22 = make(E * m / 2, d / 2);
    lw.b1 = make(E, d / 2);
    lw.b2 = make(E, d / 2);
  } else {
    lw.u = make(E * m, d);
    lw.u_bias = g_bias1 = random_vec(size_t(E * m), rng, 0.1f);
    lw.v = make(E * m, d);
    lw.b = make(E, d);
  }
  // Sparse probabilities: each head keeps 1-3 experts.
  std::vector<float> g1(size_t(T * H * E), 0.0f), g2(g1.size(), 0.0f);
  std::uniform_int_distribution<int> pick(0, int(E) - 1);
  for (auto* g : {&g1, &g2})
    for (int64_t th = 0; th < T * H; th++) {
      const int n = 1 + int(th % 3);
      for (int k = 0; k < n; k++) (*g)[size_t(th * E + pick(rng))] += 1.0f / float(n);
    }
  std::vector<float> y = random_vec(size_t(T * d), rng), dense(size_t(T * d)), sparse(size_t(T * d));
  monet::experts_forward(c, lw, y.data(), g1.data(), g2.data(), T, true, nullptr, 0, dense.data());
  monet::experts_forward(c, lw, y.data(), g1.data(), g2.data(), T, false, nullptr, 0, sparse.data());
  std::vector<double> want = explicit_sum(c, keep, y, g1, g2, T, nullptr);
  EXPECT_LT(max_rel_err(dense, want), 1e-5);
  EXPECT_LT(max_rel_err(sparse, want), 1e-5);

  // Mask: a pair, a whole side-1 component and a whole side-2 component of
  // experts that are actually routed to.
  c.num_hidden_layers = 1;
  c.moe_groups = 1;
  monet::ExpertMask mask = monet::ExpertMask::none(c);
  std::vector<int> used1, used2;
  for (int64_t i = 0; i < E; i++) {
    if (g1[size_t(i)] + g1[size_t(E + i)] > 0) used1.push_back(int(i));
    if (g2[size_t(i)] + g2[size_t(E + i)] > 0) used2.push_back(int(i));
  }
  ASSERT_FALSE(used1.empty());
  ASSERT_FALSE(used2.empty());
  mask.pairs[0] = {int64_t(used1.front()) * E + used2.front()};
  mask.side1[0][size_t(used1.back())] = 1;
  mask.side2[0][size_t(used2.back())] = 1;
  std::vector<double> masked_want = explicit_sum(c, keep, y, g1, g2, T, &mask);
  monet::experts_forward(c, lw, y.data(), g1.data(), g2.data(), T, true, &mask, 0, dense.data());
  monet::experts_forward(c, lw, y.data(), g1.data(), g2.data(), T, false, &mask, 0, sparse.data());
  EXPECT_LT(max_rel_err(dense, masked_want), 1e-5);
  EXPECT_LT(max_rel_err(sparse, masked_want), 1e-5);
  EXPECT_GT(max_rel_err(sparse, want), 1e-3) << "the mask changed nothing";
}

INSTANTIATE_TEST_SUITE_P(Ops, ExpertPathsTest,
                         ::testing::Combine(::testing::Values(monet::Decompose::Vertical, monet::Decompose::Horizontal),
                                            ::testing::Values(DType::F32, DType::BF16)));

}  // namespace
