// Training-mode forward and backward of Monet (see train_model.h).
// Shapes: N = B*T tokens, d hidden, nh/nkv heads of hd, E experts, H router
// heads, m expert dim, V vocab. Matrices are row-major; `x W^T` as nn.Linear.
#include "train/train_model.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "core/monet_math.h"
#include "model/tensor_table.h"
#include "monet/comm.h"
#include "monet/error.h"

namespace monet::train {
namespace {

// C[M,N] = alpha * op(A) op(B) + beta * C, row-major.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
              lda, B, ldb, beta, C, ldc);
}
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
              lda, B, ldb, beta, C, ldc);
}

// y[N,out] (+)= x[N,in] W[out,in]^T
template <class R>
void linear(const R* x, const R* W, int64_t N, int64_t in, int64_t out, R* y, bool accumulate = false) {
  gemm(false, true, N, out, in, R(1), x, in, W, in, R(accumulate ? 1 : 0), y, out);
}

// dx[N,in] += dy W;  dW[out,in] += dy^T x
template <class R>
void linear_backward(const R* dy, const R* x, const R* W, int64_t N, int64_t in, int64_t out, R* dx, R* dW) {
  gemm(false, false, N, in, out, R(1), dy, out, W, in, R(1), dx, in);
  gemm(true, false, out, in, N, R(1), dy, out, x, in, R(1), dW, in);
}

// db[c] += sum_n dy[n, c]
template <class R>
void bias_backward(const R* dy, int64_t N, int64_t cols, R* db) {
#pragma omp parallel for
  for (int64_t c = 0; c < cols; c++) {
    R s = 0;
    for (int64_t n = 0; n < N; n++) s += dy[n * cols + c];
    db[c] += s;
  }
}

template <class R>
void rmsnorm_forward(const R* x, const R* w, int64_t N, int64_t d, double eps, R* y, R* rstd) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; n++) {
    const R* xr = x + n * d;
    R ss = 0;
    for (int64_t c = 0; c < d; c++) ss += xr[c] * xr[c];
    const R r = R(1) / std::sqrt(ss / R(d) + R(eps));
    rstd[n] = r;
    for (int64_t c = 0; c < d; c++) y[n * d + c] = w[c] * (xr[c] * r);
  }
}

// y = w * x * r, r = (mean(x^2)+eps)^-1/2:
// dx = r * w*dy - x * r^3/d * sum_c(w*dy*x);  dw += sum_n dy * x * r
template <class R>
void rmsnorm_backward(const R* dy, const R* x, const R* w, const R* rstd, int64_t N, int64_t d, R* dx, R* dw) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; n++) {
    const R* dyr = dy + n * d;
    const R* xr = x + n * d;
    const R r = rstd[n];
    R dot = 0;
    for (int64_t c = 0; c < d; c++) dot += w[c] * dyr[c] * xr[c];
    const R k = dot * r * r * r / R(d);
    for (int64_t c = 0; c < d; c++) dx[n * d + c] += r * w[c] * dyr[c] - xr[c] * k;
  }
#pragma omp parallel for
  for (int64_t c = 0; c < d; c++) {
    R s = 0;
    for (int64_t n = 0; n < N; n++) s += dy[n * d + c] * x[n * d + c] * rstd[n];
    dw[c] += s;
  }
}

// Rotary embedding on x[N, heads*hd], token n at position n % T; `inverse`
// rotates back (the backward pass of a rotation is its transpose).
template <class R>
void rope_apply(R* x, int64_t N, int64_t T, int64_t heads, int64_t hd, const R* cos_t, const R* sin_t, bool inverse) {
  const int64_t half = hd / 2;
#pragma omp parallel for
  for (int64_t n = 0; n < N; n++) {
    const R* cs = cos_t + (n % T) * half;
    const R* sn = sin_t + (n % T) * half;
    for (int64_t h = 0; h < heads; h++) {
      R* v = x + n * heads * hd + h * hd;
      for (int64_t i = 0; i < half; i++) {
        const R a = v[i], b = v[i + half];
        const R s = inverse ? -sn[i] : sn[i];
        v[i] = a * cs[i] - b * s;
        v[i + half] = b * cs[i] + a * s;
      }
    }
  }
}

// n zeros, for buffers that are accumulated into. Buffers that are written
// in full just resize (no clearing on the hot path).
template <class R>
void zeroed(std::vector<R>& v, size_t n) {
  v.assign(n, R(0));
}

}  // namespace

ParamLayout::ParamLayout(const MonetConfig& c) {
  layers.resize(size_t(c.num_hidden_layers));
  for (const TensorSpec& t : tensor_table(c)) {
    if (t.kind == TensorKind::RunningStat) continue;  // buffers, kept apart (running_mean / running_var)
    ParamInfo p;
    p.name = t.name;
    p.shape = t.shape;
    p.numel = 1;
    for (int64_t s : p.shape) p.numel *= size_t(s);
    p.offset = total;
    p.decay = t.kind == TensorKind::Matrix;
    total += p.numel;
    params.push_back(p);
    LayerOffsets* o = t.layer >= 0 ? &layers[size_t(t.layer)] : nullptr;
    switch (t.role) {
      case TensorRole::Embed: embed = p.offset; break;
      case TensorRole::LmHead: lm_head = p.offset; break;
      case TensorRole::FinalNorm: final_norm = p.offset; break;
      case TensorRole::InputNorm: o->ln1 = p.offset; break;
      case TensorRole::PostNorm: o->ln2 = p.offset; break;
      case TensorRole::Wq: o->wq = p.offset; break;
      case TensorRole::Wk: o->wk = p.offset; break;
      case TensorRole::Wv: o->wv = p.offset; break;
      case TensorRole::Wo: o->wo = p.offset; break;
      case TensorRole::RouterW1: o->w1 = p.offset, o->has_router = true; break;
      case TensorRole::RouterW2: o->w2 = p.offset; break;
      case TensorRole::U1: o->u1 = p.offset; break;
      case TensorRole::U1Bias: o->u1b = p.offset; break;
      case TensorRole::U2: o->u2 = p.offset; break;
      case TensorRole::U2Bias: o->u2b = p.offset; break;
      case TensorRole::V11: o->v11 = p.offset; break;
      case TensorRole::V12: o->v12 = p.offset; break;
      case TensorRole::V21: o->v21 = p.offset; break;
      case TensorRole::V22: o->v22 = p.offset; break;
      case TensorRole::B1: o->b1 = p.offset; break;
      case TensorRole::B2: o->b2 = p.offset; break;
      case TensorRole::U: o->u = p.offset; break;
      case TensorRole::UBias: o->ub = p.offset; break;
      case TensorRole::V: o->v = p.offset; break;
      case TensorRole::B: o->b = p.offset; break;
      case TensorRole::RouterMean1: case TensorRole::RouterVar1: case TensorRole::RouterMean2: case TensorRole::RouterVar2:
        break;
    }
  }
  if (c.tie_word_embeddings) lm_head = embed;
}

const ParamInfo* ParamLayout::find(const std::string& name) const {
  for (const ParamInfo& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

template <class R>
TrainModel<R>::TrainModel(const MonetConfig& c) : c_(c), layout_(c) {
  if (c.hidden_size % 2 || c.moe_dim % 2)
    fail("training needs an even hidden_size and moe_dim (got ", c.hidden_size, ", ", c.moe_dim, ")");
  params.assign(layout_.total, R(0));
  grads.assign(layout_.total, R(0));
  const int64_t R_n = c.num_router_layers(), H = c.moe_heads;
  running_mean.assign(R_n, std::vector<double>(2 * H, 0.0));
  running_var.assign(R_n, std::vector<double>(2 * H, 1.0));
  acts_.resize(c.num_hidden_layers);
  g1_.resize(R_n);
  g2_.resize(R_n);
  dg1_.resize(R_n);
  dg2_.resize(R_n);
}

template <class R>
void TrainModel<R>::init_random(uint64_t seed, double std) {
  uint64_t state = seed;
  auto normal = [&]() {  // Box-Muller on splitmix64: the same numbers on every platform
    const double u1 = (double(splitmix64(state) >> 11) + 1.0) * 0x1.0p-53;
    const double u2 = double(splitmix64(state) >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  };
  for (const ParamInfo& p : layout_.params) {
    R* w = params.data() + p.offset;
    const bool is_norm = p.shape.size() == 1 && p.name.find("norm") != std::string::npos;
    for (size_t i = 0; i < p.numel; i++) w[i] = p.decay ? R(std * normal()) : R(is_norm ? 1 : 0);
  }
  for (auto& v : running_mean) std::fill(v.begin(), v.end(), 0.0);
  for (auto& v : running_var) std::fill(v.begin(), v.end(), 1.0);
}

// ---------------------------------------------------------------- attention

template <class R>
void TrainModel<R>::attention_forward(int64_t l) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t d = c_.hidden_size, nh = c_.num_attention_heads, nkv = c_.num_key_value_heads, hd = c_.head_dim();
  const int64_t B = B_, T = T_, N = N_;
  const R* P = params.data();
  linear(a.xn1.data(), P + o.wq, N, d, nh * hd, a.q.data());
  linear(a.xn1.data(), P + o.wk, N, d, nkv * hd, a.k.data());
  linear(a.xn1.data(), P + o.wv, N, d, nkv * hd, a.v.data());
  rope_apply(a.q.data(), N, T, nh, hd, rope_cos_.data(), rope_sin_.data(), false);
  rope_apply(a.k.data(), N, T, nkv, hd, rope_cos_.data(), rope_sin_.data(), false);
  const R scale = R(1) / std::sqrt(R(hd));
  const int64_t ldq = nh * hd, ldk = nkv * hd, group = nh / nkv;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < nh; h++) {
      const R* Q = a.q.data() + b * T * ldq + h * hd;
      const R* K = a.k.data() + b * T * ldk + (h / group) * hd;
      const R* Vv = a.v.data() + b * T * ldk + (h / group) * hd;
      R* S = a.probs.data() + (b * nh + h) * T * T;
      gemm(false, true, T, T, hd, scale, Q, ldq, K, ldk, R(0), S, T);
      for (int64_t i = 0; i < T; i++) {  // causal softmax of row i over j <= i
        R* s = S + i * T;
        R mx = s[0];
        for (int64_t j = 1; j <= i; j++) mx = std::max(mx, s[j]);
        R sum = 0;
        for (int64_t j = 0; j <= i; j++) sum += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j <= i; j++) s[j] /= sum;
        for (int64_t j = i + 1; j < T; j++) s[j] = 0;
      }
      gemm(false, false, T, hd, T, R(1), S, T, Vv, ldk, R(0), a.att.data() + b * T * ldq + h * hd, ldq);
    }
}

// datt [N, nh*hd] -> dxn1 [N, d] (accumulated) and weight gradients.
template <class R>
void TrainModel<R>::attention_backward(int64_t l, const R* datt, R* dxn1) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t d = c_.hidden_size, nh = c_.num_attention_heads, nkv = c_.num_key_value_heads, hd = c_.head_dim();
  const int64_t B = B_, T = T_, N = N_;
  const int64_t ldq = nh * hd, ldk = nkv * hd, group = nh / nkv;
  const R scale = R(1) / std::sqrt(R(hd));
  std::vector<R> dq(static_cast<size_t>(N * ldq), R(0)), dk(static_cast<size_t>(N * ldk), R(0)), dv(static_cast<size_t>(N * ldk), R(0));
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; b++)
    for (int64_t kv = 0; kv < nkv; kv++) {
      std::vector<R> dS(static_cast<size_t>(T * T));
      const R* K = a.k.data() + b * T * ldk + kv * hd;
      const R* Vv = a.v.data() + b * T * ldk + kv * hd;
      R* dK = dk.data() + b * T * ldk + kv * hd;
      R* dV = dv.data() + b * T * ldk + kv * hd;
      for (int64_t h = kv * group; h < (kv + 1) * group; h++) {  // query heads sharing this kv head
        const R* S = a.probs.data() + (b * nh + h) * T * T;
        const R* Q = a.q.data() + b * T * ldq + h * hd;
        const R* dO = datt + b * T * ldq + h * hd;
        gemm(false, true, T, T, hd, R(1), dO, ldq, Vv, ldk, R(0), dS.data(), T);  // dP = dO V^T
        for (int64_t i = 0; i < T; i++) {  // dS = P * (dP - sum_j P dP)
          const R* p = S + i * T;
          R* g = dS.data() + i * T;
          R dot = 0;
          for (int64_t j = 0; j <= i; j++) dot += p[j] * g[j];
          for (int64_t j = 0; j < T; j++) g[j] = j <= i ? p[j] * (g[j] - dot) : R(0);
        }
        gemm(false, false, T, hd, T, scale, dS.data(), T, K, ldk, R(0), dq.data() + b * T * ldq + h * hd, ldq);
        gemm(true, false, T, hd, T, scale, dS.data(), T, Q, ldq, R(1), dK, ldk);
        gemm(true, false, T, hd, T, R(1), S, T, dO, ldq, R(1), dV, ldk);
      }
    }
  rope_apply(dq.data(), N, T, nh, hd, rope_cos_.data(), rope_sin_.data(), true);
  rope_apply(dk.data(), N, T, nkv, hd, rope_cos_.data(), rope_sin_.data(), true);
  const R* P = params.data();
  R* G = grads.data();
  linear_backward(dq.data(), a.xn1.data(), P + o.wq, N, d, nh * hd, dxn1, G + o.wq);
  linear_backward(dk.data(), a.xn1.data(), P + o.wk, N, d, nkv * hd, dxn1, G + o.wk);
  linear_backward(dv.data(), a.xn1.data(), P + o.wv, N, d, nkv * hd, dxn1, G + o.wv);
}

// ---------------------------------------------------------------- router

template <class R>
void TrainModel<R>::router_forward(int64_t l, const StepOptions& opts) {
  const LayerOffsets& o = layout_.layers[l];
  const int64_t r = l / c_.moe_groups, d = c_.hidden_size, H = c_.moe_heads, E = c_.moe_experts, N = N_;
  const double sigma = c_.router_sigma();
  std::vector<R> z(static_cast<size_t>(N * H * E));
  for (int side = 0; side < 2; side++) {
    std::vector<R>& g = side == 0 ? g1_[r] : g2_[r];
    g.resize(static_cast<size_t>(N * H * E));
    linear(acts_[l].y.data(), params.data() + (side == 0 ? o.w1 : o.w2), N, d, H * E, z.data());
    std::vector<double> mean(H), var(H);
    if (opts.training) {
      // BatchNorm1d(H) training statistics over the global batch's tokens x E
      // logits: sums per head, added over ranks, then the squared deviations
      // from the global mean, added over ranks (two passes, as on one process).
      const double cnt = double(N_all_) * double(E);
      std::vector<double> sums(static_cast<size_t>(H), 0.0);
      for (int64_t h = 0; h < H; h++) {
        double s = 0;
        for (int64_t n = 0; n < N; n++)
          for (int64_t i = 0; i < E; i++) s += double(z[(n * H + h) * E + i]);
        sums[h] = s;
      }
      if (comm_) comm_->all_reduce_sum(sums.data(), sums.size());
      for (int64_t h = 0; h < H; h++) {
        const double mu = sums[h] / cnt;
        double ss = 0;
        for (int64_t n = 0; n < N; n++)
          for (int64_t i = 0; i < E; i++) {
            const double dz = double(z[(n * H + h) * E + i]) - mu;
            ss += dz * dz;
          }
        mean[h] = mu;
        sums[h] = ss;
      }
      if (comm_) comm_->all_reduce_sum(sums.data(), sums.size());
      for (int64_t h = 0; h < H; h++) {
        var[h] = sums[h] / cnt;
        double& rm = running_mean[r][side * H + h];
        double& rv = running_var[r][side * H + h];
        rm = 0.9 * rm + 0.1 * mean[h];
        rv = 0.9 * rv + 0.1 * var[h] * cnt / (cnt - 1);
      }
    } else {
      for (int64_t h = 0; h < H; h++) {
        mean[h] = running_mean[r][side * H + h];
        var[h] = running_var[r][side * H + h];
      }
    }
#pragma omp parallel for
    for (int64_t nh = 0; nh < N * H; nh++) {
      const int64_t h = nh % H;
      const R* zr = z.data() + nh * E;
      R* gr = g.data() + nh * E;
      router_select_row<R, double>(zr, E, mean[h], 1.0 / std::sqrt(var[h] + 1e-5), sigma, gr);
    }
  }
}

// dz = g * (dg - sum_i g dg) over the kept entries (g = 0 elsewhere).
template <class R>
void TrainModel<R>::router_backward(int64_t l, R* dy) {
  const LayerOffsets& o = layout_.layers[l];
  const int64_t r = l / c_.moe_groups, d = c_.hidden_size, H = c_.moe_heads, E = c_.moe_experts, N = N_;
  LayerActs<R>& a = acts_[l];
  std::vector<R> dz(static_cast<size_t>(N * H * E));
  for (int side = 0; side < 2; side++) {
    const std::vector<R>& g = side == 0 ? g1_[r] : g2_[r];
    const std::vector<R>& dg = side == 0 ? dg1_[r] : dg2_[r];
#pragma omp parallel for
    for (int64_t nh = 0; nh < N * H; nh++) {
      const R* gr = g.data() + nh * E;
      const R* dgr = dg.data() + nh * E;
      R dot = 0;
      for (int64_t i = 0; i < E; i++) dot += gr[i] * dgr[i];
      for (int64_t i = 0; i < E; i++) dz[nh * E + i] = gr[i] * (dgr[i] - dot);
    }
    const size_t w = side == 0 ? o.w1 : o.w2;
    linear_backward(dz.data(), a.y.data(), params.data() + w, N, d, H * E, dy, grads.data() + w);
  }
}

// ---------------------------------------------------------------- experts

template <class R>
void TrainModel<R>::experts_forward(int64_t l, R* out) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t r = l / c_.moe_groups, d = c_.hidden_size, H = c_.moe_heads, E = c_.moe_experts, m = c_.moe_dim;
  const int64_t N = N_;
  const R* P = params.data();
  const R* g1 = g1_[r].data();
  const R* g2 = g2_[r].data();
  zeroed(a.a1, static_cast<size_t>(N * E));
  zeroed(a.a2, static_cast<size_t>(N * E));
  for (int64_t n = 0; n < N; n++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t i = 0; i < E; i++) {
        a.a1[n * E + i] += g1[(n * H + h) * E + i];
        a.a2[n * E + i] += g2[(n * H + h) * E + i];
      }
  if (c_.moe_decompose == Decompose::Vertical) {
    const int64_t hm = m / 2, Eh = E * hm, d2 = d / 2;
    for (auto* v : {&a.x1pre, &a.x2pre, &a.x1, &a.x2, &a.c11, &a.c22}) v->resize(static_cast<size_t>(N * Eh));
    for (auto* v : {&a.c12, &a.c21}) zeroed(*v, static_cast<size_t>(N * Eh));
    zeroed(a.p1, static_cast<size_t>(N * H * hm));
    zeroed(a.p2, static_cast<size_t>(N * H * hm));
    for (int64_t n = 0; n < N; n++) {
      std::copy(P + o.u1b, P + o.u1b + Eh, a.x1pre.begin() + n * Eh);
      std::copy(P + o.u2b, P + o.u2b + Eh, a.x2pre.begin() + n * Eh);
    }
    linear(a.y.data(), P + o.u1, N, d, Eh, a.x1pre.data(), true);
    linear(a.y.data(), P + o.u2, N, d, Eh, a.x2pre.data(), true);
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
      R* x1 = a.x1.data() + n * Eh;
      R* x2 = a.x2.data() + n * Eh;
      for (int64_t e = 0; e < Eh; e++) {
        const R v1 = std::max(a.x1pre[n * Eh + e], R(0)), v2 = std::max(a.x2pre[n * Eh + e], R(0));
        x1[e] = v1 * v1;
        x2[e] = v2 * v2;
      }
      const R* G1 = g1 + n * H * E;
      const R* G2 = g2 + n * H * E;
      R* p1 = a.p1.data() + n * H * hm;
      R* p2 = a.p2.data() + n * H * hm;
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < E; i++) {  // p1[h] = sum_i g1[h,i] x1[i];  p2[h] = sum_j g2[h,j] x2[j]
          const R w1 = G1[h * E + i], w2 = G2[h * E + i];
          if (w1 != 0)
            for (int64_t c = 0; c < hm; c++) p1[h * hm + c] += w1 * x1[i * hm + c];
          if (w2 != 0)
            for (int64_t c = 0; c < hm; c++) p2[h * hm + c] += w2 * x2[i * hm + c];
        }
      const R* A1 = a.a1.data() + n * E;
      const R* A2 = a.a2.data() + n * E;
      R* c11 = a.c11.data() + n * Eh;
      R* c12 = a.c12.data() + n * Eh;
      R* c21 = a.c21.data() + n * Eh;
      R* c22 = a.c22.data() + n * Eh;
      for (int64_t i = 0; i < E; i++) {
        for (int64_t c = 0; c < hm; c++) {
          c11[i * hm + c] = A1[i] * x1[i * hm + c];
          c22[i * hm + c] = A2[i] * x2[i * hm + c];
        }
        for (int64_t h = 0; h < H; h++) {  // c12[i] = sum_h g1[h,i] p2[h];  c21[j] = sum_h g2[h,j] p1[h]
          const R w1 = G1[h * E + i], w2 = G2[h * E + i];
          if (w1 != 0)
            for (int64_t c = 0; c < hm; c++) c12[i * hm + c] += w1 * p2[h * hm + c];
          if (w2 != 0)
            for (int64_t c = 0; c < hm; c++) c21[i * hm + c] += w2 * p1[h * hm + c];
        }
      }
    }
    // left = c11 V11^T + c12 V12^T + a1 b1;  right = c21 V21^T + c22 V22^T + a2 b2
    gemm(false, true, N, d2, Eh, R(1), a.c11.data(), Eh, P + o.v11, Eh, R(0), out, d);
    gemm(false, true, N, d2, Eh, R(1), a.c12.data(), Eh, P + o.v12, Eh, R(1), out, d);
    gemm(false, false, N, d2, E, R(1), a.a1.data(), E, P + o.b1, d2, R(1), out, d);
    gemm(false, true, N, d2, Eh, R(1), a.c21.data(), Eh, P + o.v21, Eh, R(0), out + d2, d);
    gemm(false, true, N, d2, Eh, R(1), a.c22.data(), Eh, P + o.v22, Eh, R(1), out + d2, d);
    gemm(false, false, N, d2, E, R(1), a.a2.data(), E, P + o.b2, d2, R(1), out + d2, d);
  } else {
    const int64_t Em = E * m;
    for (auto* v : {&a.xpre, &a.xact}) v->resize(static_cast<size_t>(N * Em));
    zeroed(a.q_mix, static_cast<size_t>(N * Em));
    zeroed(a.r, static_cast<size_t>(N * H * m));
    for (int64_t n = 0; n < N; n++) std::copy(P + o.ub, P + o.ub + Em, a.xpre.begin() + n * Em);
    linear(a.y.data(), P + o.u, N, d, Em, a.xpre.data(), true);
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
      R* x = a.xact.data() + n * Em;
      for (int64_t e = 0; e < Em; e++) {
        const R v = std::max(a.xpre[n * Em + e], R(0));
        x[e] = v * v;
      }
      const R* G1 = g1 + n * H * E;
      const R* G2 = g2 + n * H * E;
      R* rr = a.r.data() + n * H * m;
      R* q = a.q_mix.data() + n * Em;
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < E; i++) {  // r[h] = sum_i g1[h,i] x[i]
          const R w = G1[h * E + i];
          if (w != 0)
            for (int64_t c = 0; c < m; c++) rr[h * m + c] += w * x[i * m + c];
        }
      for (int64_t j = 0; j < E; j++)
        for (int64_t h = 0; h < H; h++) {  // q[j] = sum_h g2[h,j] r[h]
          const R w = G2[h * E + j];
          if (w != 0)
            for (int64_t c = 0; c < m; c++) q[j * m + c] += w * rr[h * m + c];
        }
    }
    gemm(false, true, N, d, Em, R(1), a.q_mix.data(), Em, P + o.v, Em, R(0), out, d);
    gemm(false, false, N, d, E, R(1), a.a2.data(), E, P + o.b, d, R(1), out, d);
  }
}

// dout [N, d] -> dy [N, d] (accumulated), dg1/dg2 of the layer's router
// group (accumulated, only where g > 0: elsewhere the router's softmax
// backward multiplies them by zero) and the expert weight gradients.
template <class R>
void TrainModel<R>::experts_backward(int64_t l, const R* dout, R* dy) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t r = l / c_.moe_groups, d = c_.hidden_size, H = c_.moe_heads, E = c_.moe_experts, m = c_.moe_dim;
  const int64_t N = N_;
  const R* P = params.data();
  R* G = grads.data();
  const R* g1 = g1_[r].data();
  const R* g2 = g2_[r].data();
  R* dg1 = dg1_[r].data();
  R* dg2 = dg2_[r].data();
  std::vector<R> da1(static_cast<size_t>(N * E)), da2(static_cast<size_t>(N * E));
  if (c_.moe_decompose == Decompose::Vertical) {
    const int64_t hm = m / 2, Eh = E * hm, d2 = d / 2;
    std::vector<R> dc11(static_cast<size_t>(N * Eh)), dc12(static_cast<size_t>(N * Eh)), dc21(static_cast<size_t>(N * Eh)), dc22(static_cast<size_t>(N * Eh));
    const R* dl = dout;
    const R* dr = dout + d2;
    // out-halves: dV += dhalf^T c;  dc = dhalf V;  db += a^T dhalf;  da = dhalf b^T
    struct Term { const R* dh; const std::vector<R>* c; size_t v; R* dc; };
    for (const Term& t : {Term{dl, &a.c11, o.v11, dc11.data()}, Term{dl, &a.c12, o.v12, dc12.data()},
                          Term{dr, &a.c21, o.v21, dc21.data()}, Term{dr, &a.c22, o.v22, dc22.data()}}) {
      gemm(true, false, d2, Eh, N, R(1), t.dh, d, t.c->data(), Eh, R(1), G + t.v, Eh);
      gemm(false, false, N, Eh, d2, R(1), t.dh, d, P + t.v, Eh, R(0), t.dc, Eh);
    }
    gemm(true, false, E, d2, N, R(1), a.a1.data(), E, dl, d, R(1), G + o.b1, d2);
    gemm(false, true, N, E, d2, R(1), dl, d, P + o.b1, d2, R(0), da1.data(), E);
    gemm(true, false, E, d2, N, R(1), a.a2.data(), E, dr, d, R(1), G + o.b2, d2);
    gemm(false, true, N, E, d2, R(1), dr, d, P + o.b2, d2, R(0), da2.data(), E);
    std::vector<R> dx1pre(static_cast<size_t>(N * Eh)), dx2pre(static_cast<size_t>(N * Eh));
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
      const R* x1 = a.x1.data() + n * Eh;
      const R* x2 = a.x2.data() + n * Eh;
      const R* p1 = a.p1.data() + n * H * hm;
      const R* p2 = a.p2.data() + n * H * hm;
      const R* A1 = a.a1.data() + n * E;
      const R* A2 = a.a2.data() + n * E;
      const R* G1 = g1 + n * H * E;
      const R* G2 = g2 + n * H * E;
      R* dG1 = dg1 + n * H * E;
      R* dG2 = dg2 + n * H * E;
      const R* d11 = dc11.data() + n * Eh;
      const R* d12 = dc12.data() + n * Eh;
      const R* d21 = dc21.data() + n * Eh;
      const R* d22 = dc22.data() + n * Eh;
      R* dA1 = da1.data() + n * E;
      R* dA2 = da2.data() + n * E;
      std::vector<R> dx1(static_cast<size_t>(Eh)), dx2(static_cast<size_t>(Eh)), dp1(static_cast<size_t>(H * hm)), dp2(static_cast<size_t>(H * hm));
      for (int64_t i = 0; i < E; i++)
        for (int64_t c = 0; c < hm; c++) {  // c11 = a1 x1, c22 = a2 x2
          dA1[i] += d11[i * hm + c] * x1[i * hm + c];
          dx1[i * hm + c] = A1[i] * d11[i * hm + c];
          dA2[i] += d22[i * hm + c] * x2[i * hm + c];
          dx2[i * hm + c] = A2[i] * d22[i * hm + c];
        }
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < E; i++) {
          if (G1[h * E + i] != 0) {  // c12[i] = sum_h g1[h,i] p2[h]
            R s = 0;
            for (int64_t c = 0; c < hm; c++) {
              s += d12[i * hm + c] * p2[h * hm + c];
              dp2[h * hm + c] += G1[h * E + i] * d12[i * hm + c];
            }
            dG1[h * E + i] += s;
          }
          if (G2[h * E + i] != 0) {  // c21[j] = sum_h g2[h,j] p1[h]
            R s = 0;
            for (int64_t c = 0; c < hm; c++) {
              s += d21[i * hm + c] * p1[h * hm + c];
              dp1[h * hm + c] += G2[h * E + i] * d21[i * hm + c];
            }
            dG2[h * E + i] += s;
          }
        }
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < E; i++) {
          if (G2[h * E + i] != 0) {  // p2[h] = sum_j g2[h,j] x2[j]
            R s = 0;
            for (int64_t c = 0; c < hm; c++) {
              s += dp2[h * hm + c] * x2[i * hm + c];
              dx2[i * hm + c] += G2[h * E + i] * dp2[h * hm + c];
            }
            dG2[h * E + i] += s + dA2[i];  // a2 = sum_h g2
          }
          if (G1[h * E + i] != 0) {  // p1[h] = sum_i g1[h,i] x1[i]
            R s = 0;
            for (int64_t c = 0; c < hm; c++) {
              s += dp1[h * hm + c] * x1[i * hm + c];
              dx1[i * hm + c] += G1[h * E + i] * dp1[h * hm + c];
            }
            dG1[h * E + i] += s + dA1[i];  // a1 = sum_h g1
          }
        }
      for (int64_t e = 0; e < Eh; e++) {  // relu(x)^2' = 2 relu(x)
        dx1pre[n * Eh + e] = dx1[e] * R(2) * std::max(a.x1pre[n * Eh + e], R(0));
        dx2pre[n * Eh + e] = dx2[e] * R(2) * std::max(a.x2pre[n * Eh + e], R(0));
      }
    }
    linear_backward(dx1pre.data(), a.y.data(), P + o.u1, N, d, Eh, dy, G + o.u1);
    linear_backward(dx2pre.data(), a.y.data(), P + o.u2, N, d, Eh, dy, G + o.u2);
    bias_backward(dx1pre.data(), N, Eh, G + o.u1b);
    bias_backward(dx2pre.data(), N, Eh, G + o.u2b);
  } else {
    const int64_t Em = E * m;
    std::vector<R> dq(static_cast<size_t>(N * Em)), dxpre(static_cast<size_t>(N * Em));
    gemm(true, false, d, Em, N, R(1), dout, d, a.q_mix.data(), Em, R(1), G + o.v, Em);
    gemm(false, false, N, Em, d, R(1), dout, d, P + o.v, Em, R(0), dq.data(), Em);
    gemm(true, false, E, d, N, R(1), a.a2.data(), E, dout, d, R(1), G + o.b, d);
    gemm(false, true, N, E, d, R(1), dout, d, P + o.b, d, R(0), da2.data(), E);
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
      const R* x = a.xact.data() + n * Em;
      const R* rr = a.r.data() + n * H * m;
      const R* DQ = dq.data() + n * Em;
      const R* G1 = g1 + n * H * E;
      const R* G2 = g2 + n * H * E;
      R* dG1 = dg1 + n * H * E;
      R* dG2 = dg2 + n * H * E;
      std::vector<R> dr(static_cast<size_t>(H * m)), dx(static_cast<size_t>(Em));
      for (int64_t h = 0; h < H; h++)
        for (int64_t j = 0; j < E; j++) {  // q[j] = sum_h g2[h,j] r[h];  a2 = sum_h g2
          const R w = G2[h * E + j];
          if (w == 0) continue;
          R s = 0;
          for (int64_t c = 0; c < m; c++) {
            s += DQ[j * m + c] * rr[h * m + c];
            dr[h * m + c] += w * DQ[j * m + c];
          }
          dG2[h * E + j] += s + da2[n * E + j];
        }
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < E; i++) {  // r[h] = sum_i g1[h,i] x[i]
          const R w = G1[h * E + i];
          if (w == 0) continue;
          R s = 0;
          for (int64_t c = 0; c < m; c++) {
            s += dr[h * m + c] * x[i * m + c];
            dx[i * m + c] += w * dr[h * m + c];
          }
          dG1[h * E + i] += s;
        }
      for (int64_t e = 0; e < Em; e++) dxpre[n * Em + e] = dx[e] * R(2) * std::max(a.xpre[n * Em + e], R(0));
    }
    linear_backward(dxpre.data(), a.y.data(), P + o.u, N, d, Em, dy, G + o.u);
    bias_backward(dxpre.data(), N, Em, G + o.ub);
  }
}

// ---------------------------------------------------------------- layers

template <class R>
void TrainModel<R>::forward_layer(int64_t l, std::vector<R>& x, const StepOptions& opts) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t d = c_.hidden_size, nh = c_.num_attention_heads, nkv = c_.num_key_value_heads, hd = c_.head_dim();
  const int64_t N = N_;
  const R* P = params.data();
  a.x_in = x;
  a.xn1.resize(static_cast<size_t>(N * d));
  a.rstd1.resize(static_cast<size_t>(N));
  a.q.resize(static_cast<size_t>(N * nh * hd));
  a.k.resize(static_cast<size_t>(N * nkv * hd));
  a.v.resize(static_cast<size_t>(N * nkv * hd));
  a.probs.resize(static_cast<size_t>(B_ * nh * T_ * T_));
  a.att.resize(static_cast<size_t>(N * nh * hd));
  a.y.resize(static_cast<size_t>(N * d));
  a.rstd2.resize(static_cast<size_t>(N));
  rmsnorm_forward(a.x_in.data(), P + o.ln1, N, d, c_.rms_norm_eps, a.xn1.data(), a.rstd1.data());
  attention_forward(l);
  a.h = a.x_in;  // h = x + o_proj(att)
  linear(a.att.data(), P + o.wo, N, nh * hd, d, a.h.data(), true);
  rmsnorm_forward(a.h.data(), P + o.ln2, N, d, c_.rms_norm_eps, a.y.data(), a.rstd2.data());
  if (o.has_router) router_forward(l, opts);
  std::vector<R> out(static_cast<size_t>(N * d));
  experts_forward(l, out.data());
  for (int64_t i = 0; i < N * d; i++) x[i] = a.h[i] + out[i];
}

// dx: gradient of the layer's output on entry, of its input on return.
template <class R>
void TrainModel<R>::backward_layer(int64_t l, std::vector<R>& dx) {
  LayerActs<R>& a = acts_[l];
  const LayerOffsets& o = layout_.layers[l];
  const int64_t d = c_.hidden_size, nh = c_.num_attention_heads, hd = c_.head_dim(), N = N_;
  R* G = grads.data();
  std::vector<R> dy(static_cast<size_t>(N * d), R(0));
  experts_backward(l, dx.data(), dy.data());
  if (o.has_router) router_backward(l, dy.data());  // the group's dg1/dg2 are complete here
  std::vector<R>& dh = dx;  // x' = h + experts(y): dh = dx' + rmsnorm'(dy)
  rmsnorm_backward(dy.data(), a.h.data(), params.data() + o.ln2, a.rstd2.data(), N, d, dh.data(), G + o.ln2);
  std::vector<R> datt(static_cast<size_t>(N * nh * hd), R(0)), dxn1(static_cast<size_t>(N * d), R(0));
  linear_backward(dh.data(), a.att.data(), params.data() + o.wo, N, nh * hd, d, datt.data(), G + o.wo);
  attention_backward(l, datt.data(), dxn1.data());
  // h = x + ...: dx = dh + rmsnorm'(dxn1), accumulated in place
  rmsnorm_backward(dxn1.data(), a.x_in.data(), params.data() + o.ln1, a.rstd1.data(), N, d, dx.data(), G + o.ln1);
}

// L_unif and L_amb (docs/training.md), averaged over routers; adds their
// gradients (times aux_weight * grad_scale) into dg1/dg2.
template <class R>
double TrainModel<R>::aux_losses(const StepOptions& opts, double* unif, double* amb) {
  const int64_t Rn = c_.num_router_layers(), H = c_.moe_heads, E = c_.moe_experts, N = N_;
  const double N_all = double(N_all_);  // means are over the global batch
  const double eps = 1e-6;
  const bool grad = opts.backward && opts.aux_weight != 0;
  const double coef = opts.aux_weight * opts.grad_scale / double(Rn);
  *unif = *amb = 0;
  for (int64_t r = 0; r < Rn; r++)
    for (int side = 0; side < 2; side++) {
      const std::vector<R>& g = side == 0 ? g1_[r] : g2_[r];
      std::vector<R>& dg = side == 0 ? dg1_[r] : dg2_[r];
      std::vector<double> gbar(static_cast<size_t>(H * E), 0.0);
      for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < H * E; k++) gbar[k] += double(g[n * H * E + k]);
      if (comm_) comm_->all_reduce_sum(gbar.data(), gbar.size());
      double log_sum = 0;
      for (double& v : gbar) {
        v /= N_all;
        log_sum += std::log(std::max(v, eps));
      }
      *unif += -log_sum / double(2 * H * E) / double(Rn);
      double amb_sum = 0;
      for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
          const R* gr = g.data() + (n * H + h) * E;
          const int64_t arg = std::max_element(gr, gr + E) - gr;
          amb_sum += 1.0 - double(gr[arg]);
          if (grad) dg[(n * H + h) * E + arg] += R(-coef / double(2 * H) / N_all);
        }
      if (comm_) comm_->all_reduce_sum(&amb_sum, 1);
      *amb += amb_sum / double(2 * H) / N_all / double(Rn);
      if (grad)
        for (int64_t n = 0; n < N; n++)
          for (int64_t k = 0; k < H * E; k++)
            if (gbar[k] >= eps) dg[n * H * E + k] += R(-coef / double(2 * H * E) / gbar[k] / N_all);
    }
  return opts.aux_weight * (*unif + *amb);
}

template <class R>
Losses TrainModel<R>::step(const int32_t* tokens, int64_t B, int64_t T, const StepOptions& opts) {
  const int64_t d = c_.hidden_size, V = c_.vocab_size, hd = c_.head_dim(), L = c_.num_hidden_layers;
  if (B < 1 || T < 1) fail("training batch must have at least one sequence of one token (got ", B, "x", T, ")");
  if (T > c_.max_position_embeddings)
    fail("sequence length ", T, " exceeds max_position_embeddings = ", c_.max_position_embeddings);
  for (int64_t i = 0; i < B * (T + 1); i++)
    if (tokens[i] < 0 || tokens[i] >= V) fail("token id ", tokens[i], " out of range [0, ", V, ")");
  B_ = B;
  T_ = T;
  N_ = B * T;
  const int64_t N = N_;
  comm_ = opts.training ? opts.comm : nullptr;
  N_all_ = N;
  if (comm_) comm_->all_reduce_sum(&N_all_, 1);
  const int64_t half = hd / 2;
  if (int64_t(rope_cos_.size()) != T * half) {
    rope_cos_.resize(static_cast<size_t>(T * half));
    rope_sin_.resize(static_cast<size_t>(T * half));
    rope_angles<R>(0, T, hd, c_.rope_theta, rope_cos_.data(), rope_sin_.data());
  }
  auto input = [&](int64_t n) { return tokens[(n / T) * (T + 1) + n % T]; };
  auto target = [&](int64_t n) { return tokens[(n / T) * (T + 1) + n % T + 1]; };

  const R* P = params.data();
  std::vector<R> x(static_cast<size_t>(N * d));
  for (int64_t n = 0; n < N; n++) std::copy(P + layout_.embed + input(n) * d, P + layout_.embed + (input(n) + 1) * d,
                                            x.begin() + n * d);
  const bool backward = opts.training && opts.backward;
  if (backward)
    for (int64_t r = 0; r < c_.num_router_layers(); r++) {
      zeroed(dg1_[r], static_cast<size_t>(N * c_.moe_heads * c_.moe_experts));
      zeroed(dg2_[r], static_cast<size_t>(N * c_.moe_heads * c_.moe_experts));
    }
  for (int64_t l = 0; l < L; l++) forward_layer(l, x, opts);
  xf_ = x;
  xfn_.resize(static_cast<size_t>(N * d));
  rstdf_.resize(static_cast<size_t>(N));
  rmsnorm_forward(xf_.data(), P + layout_.final_norm, N, d, c_.rms_norm_eps, xfn_.data(), rstdf_.data());
  probs_.resize(static_cast<size_t>(N * V));
  linear(xfn_.data(), P + layout_.lm_head, N, d, V, probs_.data());
  double lm_sum = 0;
#pragma omp parallel for reduction(+ : lm_sum)
  for (int64_t n = 0; n < N; n++) {  // cross-entropy; probs_ becomes softmax(logits)
    R* p = probs_.data() + n * V;
    lm_sum += nll_from_logits(p, V, target(n));
    const R mx = *std::max_element(p, p + V);
    R sum = 0;
    for (int64_t v = 0; v < V; v++) sum += (p[v] = std::exp(p[v] - mx));
    for (int64_t v = 0; v < V; v++) p[v] /= sum;
  }
  if (comm_) comm_->all_reduce_sum(&lm_sum, 1);
  Losses losses;
  losses.lm = lm_sum / double(N_all_);
  losses.total = losses.lm;
  if (opts.training) losses.total += aux_losses(opts, &losses.unif, &losses.amb);
  if (!backward) return losses;

  R* G = grads.data();
  const R scale = R(opts.grad_scale / double(N_all_));
#pragma omp parallel for
  for (int64_t n = 0; n < N; n++) {  // dlogits = (softmax - onehot) * scale / N
    R* p = probs_.data() + n * V;
    p[target(n)] -= R(1);
    for (int64_t v = 0; v < V; v++) p[v] *= scale;
  }
  std::vector<R> dxfn(static_cast<size_t>(N * d), R(0)), dx(static_cast<size_t>(N * d), R(0));
  linear_backward(probs_.data(), xfn_.data(), P + layout_.lm_head, N, d, V, dxfn.data(), G + layout_.lm_head);
  rmsnorm_backward(dxfn.data(), xf_.data(), P + layout_.final_norm, rstdf_.data(), N, d, dx.data(),
                   G + layout_.final_norm);
  for (int64_t l = L - 1; l >= 0; l--) backward_layer(l, dx);
  for (int64_t n = 0; n < N; n++) {
    R* de = G + layout_.embed + input(n) * d;
    for (int64_t c = 0; c < d; c++) de[c] += dx[n * d + c];
  }
  return losses;
}

template class TrainModel<float>;
template class TrainModel<double>;

}  // namespace monet::train
