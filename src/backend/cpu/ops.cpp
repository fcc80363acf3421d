#include "backend/cpu/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own
// _mm512_undefined_* helpers (GCC PR 105593); nothing of ours is affected.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif

namespace monet::cpu {
namespace {

// Activation batches up to this many rows use the streaming GEMV kernels
// (weights read once, all rows served from L1); larger ones go to sgemm.
constexpr int64_t kGemvMaxRows = 8;

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// y[t] = row . x[t] for t < T (T <= kGemvMaxRows), one pass over the row.
template <class W>
void dot_row_multi(const W* row, const float* x, int64_t T, int64_t K, float* y, int64_t ystride) {
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 acc[kGemvMaxRows];
  for (int64_t t = 0; t < kGemvMaxRows; t++) acc[t] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m512 w = load16(row + k);
    for (int64_t t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * K + k), acc[t]);
  }
  float sums[kGemvMaxRows];
  for (int64_t t = 0; t < T; t++) sums[t] = _mm512_reduce_add_ps(acc[t]);
#else
  float sums[kGemvMaxRows] = {};
#endif
  for (; k < K; k++) {
    float w = to_f32(row[k]);
    for (int64_t t = 0; t < T; t++) sums[t] += w * x[t * K + k];
  }
  for (int64_t t = 0; t < T; t++) y[t * ystride] = sums[t];
}

template <class W>
void axpy_row(const W* row, float coef, float* out, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 a = _mm512_set1_ps(coef);
  for (; c + 16 <= n; c += 16) _mm512_storeu_ps(out + c, _mm512_fmadd_ps(a, load16(row + c), _mm512_loadu_ps(out + c)));
#endif
  for (; c < n; c++) out[c] += coef * to_f32(row[c]);
}

// Scratch space for float32 copies of BF16 weights fed to sgemm; reused.
// One per thread: windows of a corpus run side by side (for_each_window).
std::vector<float>& widen_scratch() {
  static thread_local std::vector<float> buf;
  return buf;
}

const float* as_f32(const Weight& w) {
  if (w.dtype == DType::F32) return w.f32();
  auto& buf = widen_scratch();
  size_t n = size_t(w.rows) * size_t(w.cols);
  if (buf.size() < n) buf.resize(n);
  widen(w, 0, int64_t(n), buf.data());
  return buf.data();
}

}  // namespace

void widen(const Weight& w, int64_t offset, int64_t n, float* out) {
  if (w.dtype == DType::F32) {
    std::memcpy(out, w.f32() + offset, size_t(n) * 4);
    return;
  }
  const uint16_t* src = w.bf16() + offset;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(src[i]);
}

void dot_rows(const Weight& w, int64_t row0, int64_t nrows, const float* x, float* y) {
  int64_t K = w.cols;
  for (int64_t r = 0; r < nrows; r++) {
    if (w.dtype == DType::BF16)
      dot_row_multi(w.bf16() + (row0 + r) * K, x, 1, K, y + r, 1);
    else
      dot_row_multi(w.f32() + (row0 + r) * K, x, 1, K, y + r, 1);
  }
}

void axpy_rows(const Weight& w, int64_t row0, int64_t nrows, const float* coef, float* out,
               int64_t c0, int64_t c1) {
  int64_t N = w.cols;
  for (int64_t r = 0; r < nrows; r++) {
    if (coef[r] == 0.0f) continue;
    if (w.dtype == DType::BF16)
      axpy_row(w.bf16() + (row0 + r) * N + c0, coef[r], out + c0, c1 - c0);
    else
      axpy_row(w.f32() + (row0 + r) * N + c0, coef[r], out + c0, c1 - c0);
  }
}

void linear(const Weight& w, const float* x, int64_t T, float* y, const float* bias) {
  const int64_t N = w.rows, K = w.cols;
  if (T <= kGemvMaxRows) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      if (w.dtype == DType::BF16)
        dot_row_multi(w.bf16() + n * K, x, T, K, y + n, N);
      else
        dot_row_multi(w.f32() + n * K, x, T, K, y + n, N);
    }
  } else {
    const float* wf = as_f32(w);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(N), int(K), 1.0f, x, int(K), wf,
                int(K), 0.0f, y, int(N));
  }
  if (bias) {
#pragma omp parallel for schedule(static) if (T * N > (1 << 16))
    for (int64_t t = 0; t < T; t++)
      for (int64_t n = 0; n < N; n++) y[t * N + n] += bias[n];
  }
}

void matmul_nn(const float* x, int64_t T, const Weight& w, float* y, bool accumulate) {
  const int64_t K = w.rows, N = w.cols;
  const float* wf = as_f32(w);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T), int(N), int(K), 1.0f, x, int(K), wf,
              int(N), accumulate ? 1.0f : 0.0f, y, int(N));
}

void rmsnorm(const float* x, const float* w, int64_t T, int64_t d, double eps, float* y) {
  for (int64_t t = 0; t < T; t++) {
    const float* xt = x + t * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; i++) ss += xt[i] * xt[i];
    float inv = 1.0f / std::sqrt(ss / float(d) + float(eps));
    for (int64_t i = 0; i < d; i++) y[t * d + i] = w[i] * (xt[i] * inv);
  }
}

void rope_table(int64_t T, int64_t hd, int64_t pos0, double theta, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const int64_t half = hd / 2;
  cos_t.resize(size_t(T * half));
  sin_t.resize(size_t(T * half));
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; i++) inv_freq[size_t(i)] = float(1.0 / std::pow(theta, double(2 * i) / double(hd)));
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < half; i++) {
      const float angle = float(pos0 + t) * inv_freq[size_t(i)];
      cos_t[size_t(t * half + i)] = std::cos(angle);
      sin_t[size_t(t * half + i)] = std::sin(angle);
    }
}

void rope(float* x, int64_t T, int64_t n_heads, int64_t hd, const float* cos_t, const float* sin_t) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < T; t++) {
    const float* cosv = cos_t + t * half;
    const float* sinv = sin_t + t * half;
    for (int64_t h = 0; h < n_heads; h++) {
      float* v = x + (t * n_heads + h) * hd;
      for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cosv[i] - b * sinv[i];
        v[i + half] = b * cosv[i] + a * sinv[i];
      }
    }
  }
}

void attention(const float* q, const float* k, const float* v, int64_t pos0, int64_t T,
               int64_t nh, int64_t nkv, int64_t hd, float* out) {
  const int64_t group = nh / nkv;
  const int64_t kv_stride = nkv * hd, q_stride = nh * hd, P = pos0 + T;
  const float scale = 1.0f / std::sqrt(float(hd));
  if (T >= kGemvMaxRows) {
    // Prefill: per head, S = Q K^T (GEMM), causal softmax by rows, O = S V (GEMM).
    std::vector<float> scores(size_t(nh * T * P));
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t h = 0; h < nh; h++) {
      const int64_t kvh = h / group;
      float* S = scores.data() + h * T * P;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(P), int(hd), scale, q + h * hd, int(q_stride),
                  k + kvh * hd, int(kv_stride), 0.0f, S, int(P));
      for (int64_t t = 0; t < T; t++) {
        float* row = S + t * P;
        const int64_t n_pos = pos0 + t + 1;
        float max_s = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < n_pos; p++) max_s = std::max(max_s, row[p]);
        float sum = 0.0f;
        for (int64_t p = 0; p < n_pos; p++) sum += (row[p] = std::exp(row[p] - max_s));
        const float inv_sum = 1.0f / sum;
        for (int64_t p = 0; p < n_pos; p++) row[p] *= inv_sum;
        std::fill(row + n_pos, row + P, 0.0f);  // causal: later positions get no weight
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T), int(hd), int(P), 1.0f, S, int(P),
                  v + kvh * hd, int(kv_stride), 0.0f, out + h * hd, int(q_stride));
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(P));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t t = 0; t < T; t++) {
      for (int64_t h = 0; h < nh; h++) {
        const float* qv = q + (t * nh + h) * hd;
        const int64_t kvh = h / group;
        const int64_t n_pos = pos0 + t + 1;
        float max_s = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < n_pos; p++) {
          const float* kp = k + p * kv_stride + kvh * hd;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < hd; i++) s += qv[i] * kp[i];
          s *= scale;
          scores[size_t(p)] = s;
          max_s = std::max(max_s, s);
        }
        float sum = 0.0f;
        for (int64_t p = 0; p < n_pos; p++) {
          scores[size_t(p)] = std::exp(scores[size_t(p)] - max_s);
          sum += scores[size_t(p)];
        }
        float* o = out + (t * nh + h) * hd;
        std::fill(o, o + hd, 0.0f);
        const float inv_sum = 1.0f / sum;
        for (int64_t p = 0; p < n_pos; p++) {
          const float* vp = v + p * kv_stride + kvh * hd;
          const float a = scores[size_t(p)] * inv_sum;
#pragma omp simd
          for (int64_t i = 0; i < hd; i++) o[i] += a * vp[i];
        }
      }
    }
  }
}

void router_select(const float* z, const float* mean, const float* var, int64_t T, int64_t H,
                   int64_t E, double sigma, float* g) {
#pragma omp parallel for collapse(2) schedule(static) if (T * H * E > (1 << 14))
  for (int64_t t = 0; t < T; t++) {
    for (int64_t h = 0; h < H; h++) {
      const float* zr = z + (t * H + h) * E;
      float* gr = g + (t * H + h) * E;
      const float mu = mean[h];
      const float inv_std = 1.0f / std::sqrt(var[h] + 1e-5f);
      // The threshold is min(max_i n_i, sigma): the top entry always passes.
      float max_n = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < E; i++) max_n = std::max(max_n, (zr[i] - mu) * inv_std);
      const float cut = std::min(max_n, float(sigma));
      float max_z = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < E; i++)
        if ((zr[i] - mu) * inv_std >= cut) max_z = std::max(max_z, zr[i]);
      double sum = 0.0;
      for (int64_t i = 0; i < E; i++) {
        float e = ((zr[i] - mu) * inv_std >= cut) ? std::exp(zr[i] - max_z) : 0.0f;
        gr[i] = e;
        sum += e;
      }
      const float inv = float(1.0 / sum);
      for (int64_t i = 0; i < E; i++) gr[i] *= inv;
    }
  }
}

void relu2(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float r = x[i] > 0.0f ? x[i] : 0.0f;
    x[i] = r * r;
  }
}

}  // namespace monet::cpu
