// The per-op harness (as llama.cpp's test-backend-ops): every op of every
// backend this build has — for the CPU backend, every kernel level this
// machine runs — against plain double-precision loops written here from
// docs/monet.md, on random shapes including odd sizes. A device backend
// passes by being added to backends() below.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/amx.h"
#include "backend/cpu/gemm.h"
#include "backend/cpu/kernels.h"
#include "monet/error.h"
#include "monet/mask.h"

namespace {

using monet::Backend;
using monet::DType;
using monet::Weight;

// Backends under test, "device/kernels/compute": the CPU backend with each
// kernel level this CPU runs, in exact float32 and in bf16 compute.
std::vector<std::string> backends() {
  std::vector<std::string> names;
  for (const auto& k : monet::cpu::kernel_sets()) {
    if (!k.supported) continue;
    names.push_back(std::string("cpu/") + k.set->name + "/f32");
    names.push_back(std::string("cpu/") + k.set->name + "/bf16");  // native or emulated bf16 products
  }
  return names;
}

std::unique_ptr<Backend> make(const std::string& name, int threads = 2) {
  const size_t a = name.find('/'), b = name.rfind('/');
  monet::BackendOptions o;
  o.device = name.substr(0, a);
  o.cpu_kernels = name.substr(a + 1, b - a - 1);
  o.compute = name.substr(b + 1);
  o.threads = threads;
  return monet::make_backend(o);
}

// The value a bf16-compute product sees: x rounded to bf16.
double bf16(float x) { return monet::bf16_to_f32(monet::f32_to_bf16(x)); }

// A weight of random values stored as `dtype`; `values` are the values it
// holds (after rounding to the dtype), which the reference loops use.
struct TestWeight {
  Weight w;
  std::vector<float> values;
};

TestWeight random_weight(int64_t rows, int64_t cols, DType dtype, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(size_t(rows * cols));
  for (float& x : v) x = nd(rng);
  TestWeight t;
  t.w = Weight::from_f32(v.data(), rows, cols, dtype);
  t.values.resize(v.size());
  t.w.rows_to_f32(0, rows, t.values.data());
  return t;
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

// want[t * N + n] = sum_k w[n * K + k] x[t * K + k], in double.
std::vector<double> reference_products(const std::vector<float>& w, const std::vector<float>& x, int64_t T, int64_t N,
                                       int64_t K) {
  std::vector<double> want(size_t(T * N));
  for (int64_t t = 0; t < T; t++)
    for (int64_t n = 0; n < N; n++) {
      double s = 0;
      for (int64_t k = 0; k < K; k++) s += double(w[size_t(n * K + k)]) * x[size_t(t * K + k)];
      want[size_t(t * N + n)] = s;
    }
  return want;
}

// Backend memory holding a host vector (host memory on the CPU backend; the
// copies make the harness right for device backends too).
struct DeviceVec {
  Backend& be;
  monet::Buffer buf;
  size_t n;
  DeviceVec(Backend& b, const std::vector<float>& host) : be(b), buf(b.alloc(host.size() * 4)), n(host.size()) {
    be.from_host(buf.data(), host.data(), n * 4);
  }
  DeviceVec(Backend& b, size_t count) : be(b), buf(b.alloc(count * 4)), n(count) {}
  float* get() const { return buf.f32(); }
  std::vector<float> host() const {
    std::vector<float> out(n);
    be.to_host(out.data(), buf.data(), n * 4);
    return out;
  }
};

class BackendOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    be = make(GetParam());
    bf16_compute = GetParam().substr(GetParam().rfind('/') + 1) == "bf16";
  }
  std::unique_ptr<Backend> be;
  bool bf16_compute = false;  // large products take bf16-rounded inputs (GEMMs, not the streamed small batches)
};

const DType kWeightTypes[] = {DType::F32, DType::BF16, DType::F16, DType::Q8_0};

// The values Q8_0 products see of activations x[0..n): blocks of 32 with
// d = max|x| / 127 and q = x * (1 / d) rounded to nearest even
// (docs/quantization.md), in plain loops.
std::vector<float> q8_activations(const float* x, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t b = 0; b < n / 32; b++) {
    float amax = 0.0f;
    for (int64_t i = 0; i < 32; i++) amax = std::max(amax, std::fabs(x[b * 32 + i]));
    // (a block under 127 FLT_MIN quantizes to zero: 1 / d is not finite)
    const float d = amax / 127.0f, id = d >= std::numeric_limits<float>::min() ? 1.0f / d : 0.0f;
    for (int64_t i = 0; i < 32; i++) out[size_t(b * 32 + i)] = d * std::nearbyint(x[b * 32 + i] * id);
  }
  return out;
}

TEST_P(BackendOps, Embed) {
  std::mt19937 rng(1);
  for (DType dt : kWeightTypes) {
    const int64_t V = 37, d = 64;  // Q8_0 rows need whole blocks of 32
    TestWeight table = random_weight(V, d, dt, rng);
    Weight w = be->prepare(table.w);
    const std::vector<int32_t> ids = {5, 0, 36, 5, 17};
    DeviceVec x(*be, ids.size() * size_t(d));
    be->embed(w, ids.data(), int64_t(ids.size()), x.get());
    std::vector<double> want;
    for (int32_t id : ids)
      for (int64_t k = 0; k < d; k++) want.push_back(table.values[size_t(id * d + k)]);
    EXPECT_EQ(max_rel_err(x.host(), want), 0.0) << monet::dtype_name(dt);
  }
}

TEST_P(BackendOps, Linear) {
  std::mt19937 rng(2);
  for (DType dt : kWeightTypes)
    for (int64_t T : {1, 3, 8, 9, 40, 130}) {
      const bool q = dt == DType::Q8_0;
      const int64_t N = std::uniform_int_distribution<int64_t>(1, 300)(rng);
      const int64_t K = q ? 32 * std::uniform_int_distribution<int64_t>(1, 5)(rng)
                          : std::uniform_int_distribution<int64_t>(1, 200)(rng);
      TestWeight w = random_weight(N, K, dt, rng);
      Weight wp = be->prepare(w.w);
      const std::vector<float> xh = random_vec(size_t(T * K), rng), bias = random_vec(size_t(N), rng);
      Weight bw = be->prepare(Weight::from_f32(bias.data(), 1, N, DType::F32));
      DeviceVec x(*be, xh), y(*be, size_t(T * N));
      // Q8_0 weights multiply int8 activations (docs/quantization.md), whatever the compute.
      const std::vector<float> xq = q ? q8_activations(xh.data(), T * K) : xh;
      // exact: the routers' float32 products in every compute (on AMX, bf16
      // weights take the split inputs of GemmCompute::F32Split).
      for (bool exact : {false, true})
        for (bool with_bias : {false, true}) {
          be->linear(wp, x.get(), T, y.get(), with_bias ? &bw : nullptr, exact);
          // bf16 compute rounds the inputs of a GEMM, and of the row kernels for
          // bf16 weights (the same products whatever the batch size); Q8_0
          // products take int8 activations instead.
          const bool rounded = !exact && bf16_compute && (T > monet::cpu::kSmallBatch || dt == DType::BF16) && !q;
          std::vector<float> wv = w.values, xv = exact ? xh : xq;
          if (rounded) {
            for (float& v : wv) v = float(bf16(v));
            for (float& v : xv) v = float(bf16(v));
          }
          std::vector<double> want = reference_products(wv, xv, T, N, K);
          if (with_bias)
            for (int64_t t = 0; t < T; t++)
              for (int64_t n = 0; n < N; n++) want[size_t(t * N + n)] += bias[size_t(n)];
          EXPECT_LT(max_rel_err(y.host(), want), 2e-6 * std::sqrt(double(K)))
              << monet::dtype_name(dt) << " T=" << T << " N=" << N << " K=" << K << " bias=" << with_bias
              << " exact=" << exact;
        }
    }
}

// The routers' exact products at a router's depth (K = 2048): float32
// accuracy in every compute, whichever path takes them (OpenBLAS, or AMX
// with split inputs): measured 1.7e-7 to 6.2e-7 of the largest output; the
// split without its lo parts (16 of the 24 bits) 2.0e-6.
TEST_P(BackendOps, ExactLinearAtRouterDepth) {
  std::mt19937 rng(12);
  const int64_t T = 48, N = 40, K = 2048;
  for (DType dt : {DType::F32, DType::BF16}) {
    TestWeight w = random_weight(N, K, dt, rng);
    Weight wp = be->prepare(w.w);
    const std::vector<float> xh = random_vec(size_t(T * K), rng);
    DeviceVec x(*be, xh), y(*be, size_t(T * N));
    be->linear(wp, x.get(), T, y.get(), nullptr, /*exact=*/true);
    EXPECT_LT(max_rel_err(y.host(), reference_products(w.values, xh, T, N, K)), 1e-6) << monet::dtype_name(dt);
  }
}

TEST_P(BackendOps, NormsAddActivation) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 4; trial++) {
    const int64_t T = std::uniform_int_distribution<int64_t>(1, 9)(rng), d = std::uniform_int_distribution<int64_t>(1, 300)(rng);
    const std::vector<float> xh = random_vec(size_t(T * d), rng, 2.0f), wv = random_vec(size_t(d), rng),
                             bv = random_vec(size_t(d), rng);
    Weight w = be->prepare(Weight::from_f32(wv.data(), 1, d, DType::F32));
    Weight b = be->prepare(Weight::from_f32(bv.data(), 1, d, DType::F32));
    DeviceVec x(*be, xh), y(*be, size_t(T * d));
    std::vector<double> rms(size_t(T * d)), ln(size_t(T * d));
    for (int64_t t = 0; t < T; t++) {
      double ss = 0, sum = 0, var = 0;
      for (int64_t i = 0; i < d; i++) {
        ss += double(xh[size_t(t * d + i)]) * xh[size_t(t * d + i)];
        sum += xh[size_t(t * d + i)];
      }
      const double mean = sum / double(d);
      for (int64_t i = 0; i < d; i++) var += (xh[size_t(t * d + i)] - mean) * (xh[size_t(t * d + i)] - mean);
      for (int64_t i = 0; i < d; i++) {
        rms[size_t(t * d + i)] = wv[size_t(i)] * xh[size_t(t * d + i)] / std::sqrt(ss / double(d) + 1e-6);
        ln[size_t(t * d + i)] = (xh[size_t(t * d + i)] - mean) / std::sqrt(var / double(d) + 1e-5) * wv[size_t(i)] + bv[size_t(i)];
      }
    }
    be->rmsnorm(x.get(), w, T, d, 1e-6, y.get());
    EXPECT_LT(max_rel_err(y.host(), rms), 1e-5) << "rmsnorm d=" << d;
    be->layernorm(x.get(), w, b, T, d, 1e-5, y.get());
    EXPECT_LT(max_rel_err(y.host(), ln), 1e-5) << "layernorm d=" << d;

    const std::vector<float> yh = random_vec(size_t(T * d), rng);
    DeviceVec z(*be, xh), addend(*be, yh);
    be->add(z.get(), addend.get(), T * d);
    std::vector<double> sum(size_t(T * d));
    for (size_t i = 0; i < sum.size(); i++) sum[i] = double(xh[i]) + yh[i];
    EXPECT_LT(max_rel_err(z.host(), sum), 1e-7);

    for (monet::Activation a : {monet::Activation::Relu2, monet::Activation::GeluQuick, monet::Activation::Gelu}) {
      DeviceVec v(*be, xh);
      be->activation(a, v.get(), T * d);
      std::vector<double> want(xh.size());
      for (size_t i = 0; i < xh.size(); i++) {
        const double u = xh[i];
        want[i] = a == monet::Activation::Relu2 ? (u > 0 ? u * u : 0.0)
                  : a == monet::Activation::GeluQuick ? u / (1.0 + std::exp(-1.702 * u))
                                                      : 0.5 * u * (1.0 + std::erf(u / std::sqrt(2.0)));
      }
      EXPECT_LT(max_rel_err(v.host(), want), 1e-6) << "activation " << int(a);
    }
  }
}

// Copies within the backend, to and from the host: sizes around the CPU
// backend's split into per-thread pieces (1 MiB), with any remainder, with
// up to 16 threads, and overlapping ranges (memmove's semantics).
TEST_P(BackendOps, Copy) {
  const std::string name = GetParam();
  for (int threads : {1, 2, 3, 16}) {
    std::unique_ptr<Backend> b = make(name, threads);
    for (size_t bytes : {size_t(0), size_t(5), (size_t(1) << 20) - 4, size_t(1) << 20, (size_t(1) << 20) + 4,
                         (size_t(1) << 20) + 64 * 16 + 3, (size_t(3) << 20) + 12}) {
      std::vector<uint8_t> src(bytes + 64), back(bytes + 64, 0xAB);
      for (size_t i = 0; i < src.size(); i++) src[i] = uint8_t(i * 131 + 7);
      monet::Buffer dev = b->alloc(bytes + 64), dev2 = b->alloc(bytes + 64);
      b->from_host(dev.data(), src.data(), bytes);
      b->copy(dev2.data(), dev.data(), bytes);
      b->to_host(back.data(), dev2.data(), bytes);
      EXPECT_TRUE(std::equal(src.begin(), src.begin() + ptrdiff_t(bytes), back.begin())) << bytes << " bytes, " << threads << " threads";
      EXPECT_EQ(back[bytes], 0xAB) << "past the end";
      // Overlapping: moved forward by 8 bytes within one buffer.
      if (bytes >= 8) {
        uint8_t* p = static_cast<uint8_t*>(dev.data());
        b->copy(p + 8, p, bytes - 8);
        std::vector<uint8_t> moved(bytes);
        b->to_host(moved.data(), p, bytes);
        EXPECT_TRUE(std::equal(src.begin(), src.begin() + ptrdiff_t(bytes - 8), moved.begin() + 8)) << bytes << " bytes overlapping";
      }
    }
  }
}

TEST_P(BackendOps, Rope) {
  std::mt19937 rng(4);
  for (int64_t hd : {2, 8, 64, 128}) {
    const int64_t T = 5, heads = 3;
    // Each row's own position, as in a batch of sequences.
    const std::vector<int64_t> pos = {0, 1, 7, 300, 301};
    const std::vector<float> xh = random_vec(size_t(T * heads * hd), rng);
    std::vector<float> cos_t(size_t(T * hd / 2)), sin_t(cos_t.size());
    std::vector<double> want(xh.size());
    for (int64_t t = 0; t < T; t++)
      for (int64_t i = 0; i < hd / 2; i++) {
        const double angle = double(pos[size_t(t)]) * std::pow(10000.0, -2.0 * double(i) / double(hd));
        cos_t[size_t(t * hd / 2 + i)] = float(std::cos(angle));
        sin_t[size_t(t * hd / 2 + i)] = float(std::sin(angle));
        for (int64_t h = 0; h < heads; h++) {
          const size_t lo = size_t((t * heads + h) * hd + i), hi = lo + size_t(hd / 2);
          want[lo] = xh[lo] * std::cos(angle) - xh[hi] * std::sin(angle);
          want[hi] = xh[hi] * std::cos(angle) + xh[lo] * std::sin(angle);
        }
      }
    DeviceVec x(*be, xh), c(*be, cos_t), s(*be, sin_t);
    be->rope(x.get(), T, heads, hd, c.get(), s.get());
    EXPECT_LT(max_rel_err(x.host(), want), 1e-6) << "hd=" << hd;
  }
}

// Plain softmax attention of one query row over keys [0, n_keys).
void attention_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, int64_t qrow,
                   int64_t n_keys, int64_t nh, int64_t nkv, int64_t hd, std::vector<double>& out) {
  for (int64_t h = 0; h < nh; h++) {
    const int64_t g = h / (nh / nkv);
    std::vector<double> s(static_cast<size_t>(n_keys));
    double mx = -1e300, sum = 0;
    for (int64_t p = 0; p < n_keys; p++) {
      double dot = 0;
      for (int64_t i = 0; i < hd; i++) dot += double(q[size_t((qrow * nh + h) * hd + i)]) * k[size_t((p * nkv + g) * hd + i)];
      s[size_t(p)] = dot / std::sqrt(double(hd));
      mx = std::max(mx, s[size_t(p)]);
    }
    for (double& e : s) sum += (e = std::exp(e - mx));
    for (int64_t i = 0; i < hd; i++) {
      double o = 0;
      for (int64_t p = 0; p < n_keys; p++) o += s[size_t(p)] / sum * v[size_t((p * nkv + g) * hd + i)];
      out[size_t((qrow * nh + h) * hd + i)] = o;
    }
  }
}

TEST_P(BackendOps, Attention) {
  std::mt19937 rng(5);
  struct Shape {
    int64_t nh, nkv, hd;
  };
  // Sequences (pos0, n): decode tokens and prompts mixed; long ones cross key blocks.
  const std::vector<std::pair<int64_t, int64_t>> seq_shapes = {{0, 1}, {3, 4}, {0, 20}, {5, 13}, {290, 1}, {0, 300}, {130, 70}};
  for (Shape sh : {Shape{4, 2, 6}, Shape{3, 3, 17}, Shape{8, 1, 64}, Shape{4, 2, 128}})
    for (bool causal : {true, false}) {
      const int64_t q_stride = sh.nh * sh.hd, kv_stride = sh.nkv * sh.hd;
      int64_t rows = 0;
      for (auto [p0, n] : seq_shapes) rows += n;
      const std::vector<float> qh = random_vec(size_t(rows * q_stride), rng);
      DeviceVec q(*be, qh), out(*be, size_t(rows * q_stride));
      std::vector<DeviceVec> ks, vs;
      std::vector<std::vector<float>> kh, vh;
      std::vector<monet::AttentionSeq> seqs;
      int64_t row0 = 0;
      for (auto [p0, n] : seq_shapes) {
        kh.push_back(random_vec(size_t((p0 + n) * kv_stride), rng));
        vh.push_back(random_vec(size_t((p0 + n) * kv_stride), rng));
        ks.emplace_back(*be, kh.back());
        vs.emplace_back(*be, vh.back());
        seqs.push_back({row0, n, p0, ks.back().get(), vs.back().get()});
        row0 += n;
      }
      be->attention(q.get(), seqs.data(), int64_t(seqs.size()), sh.nh, sh.nkv, sh.hd, causal, out.get());
      const std::vector<float> got = out.host();
      // The same kernels in float32, and under auto for bf16 projections
      // (which must take the tiles where bf16 compute does: bit for bit).
      const std::string level = GetParam().substr(0, GetParam().rfind('/'));
      DeviceVec out_f32(*be, size_t(rows * q_stride)), out_auto(*be, size_t(rows * q_stride));
      make(level + "/f32")->attention(q.get(), seqs.data(), int64_t(seqs.size()), sh.nh, sh.nkv, sh.hd, causal,
                                      out_f32.get(), DType::BF16);
      make(level + "/auto")->attention(q.get(), seqs.data(), int64_t(seqs.size()), sh.nh, sh.nkv, sh.hd, causal,
                                       out_auto.get(), DType::BF16);
      const std::vector<float> got_f32 = out_f32.host(), got_auto = out_auto.host();
      for (size_t s = 0; s < seqs.size(); s++) {
        // bf16 compute on a CPU with AMX: a sequence of 16 queries or more
        // (head size 64 or 128) runs on the bf16 tiles, from q, k, v rounded
        // to bf16 (as the reference takes them here) and its softmax weights
        // rounded too. Each weight moves by at most 2^-8 of itself, so the
        // error is at most 2^-8 max|v|; these seeded inputs give 0.7-1.6e-3
        // of the largest output, held under 2^-9.
        const bool tiles = bf16_compute && monet::cpu::amx::usable() && (sh.hd == 64 || sh.hd == 128) && seqs[s].n >= 16;
        const auto first = got.begin() + seqs[s].row0 * q_stride, last = got.begin() + (seqs[s].row0 + seqs[s].n) * q_stride;
        const auto first_f32 = got_f32.begin() + (first - got.begin());
        const auto first_auto = got_auto.begin() + (first - got.begin());
        if (tiles) {
          EXPECT_FALSE(std::equal(first, last, first_f32)) << "seq " << s << ": not on the tiles";
          EXPECT_TRUE(std::equal(first, last, first_auto)) << "seq " << s << ": auto with bf16 projections differs";
        } else if (!bf16_compute) {
          EXPECT_TRUE(std::equal(first, last, first_f32)) << "seq " << s;
        }
        auto maybe_rounded = [&](std::vector<float> v) {
          if (tiles)
            for (float& x : v) x = float(bf16(x));
          return v;
        };
        // The sequence's queries, each against its own keys.
        const std::vector<float> qs = maybe_rounded(
            std::vector<float>(qh.begin() + seqs[s].row0 * q_stride, qh.begin() + (seqs[s].row0 + seqs[s].n) * q_stride));
        const std::vector<float> k_ref = maybe_rounded(kh[s]), v_ref = maybe_rounded(vh[s]);
        std::vector<double> want(qs.size());
        for (int64_t r = 0; r < seqs[s].n; r++)
          attention_ref(qs, k_ref, v_ref, r, causal ? seqs[s].pos0 + r + 1 : seqs[s].pos0 + seqs[s].n, sh.nh, sh.nkv,
                        sh.hd, want);
        const std::vector<float> got_s(got.begin() + seqs[s].row0 * q_stride, got.begin() + (seqs[s].row0 + seqs[s].n) * q_stride);
        EXPECT_LT(max_rel_err(got_s, want), tiles ? std::ldexp(1.0, -9) : 1e-5)
            << "nh=" << sh.nh << " nkv=" << sh.nkv << " hd=" << sh.hd << " causal=" << causal << " seq " << s
            << " tiles=" << tiles;
      }
    }
}

TEST_P(BackendOps, RouterSelect) {
  std::mt19937 rng(6);
  for (int64_t E : {1, 5, 64, 131}) {
    const int64_t T = 6, H = 3;
    const double sigma = 1.5;
    const std::vector<float> zh = random_vec(size_t(T * H * E), rng, 2.0f);
    const std::vector<float> mean = {0.1f, -0.2f, 0.0f}, var = {4.0f, 3.5f, 5.0f};
    Weight mw = be->prepare(Weight::from_f32(mean.data(), 1, H, DType::F32));
    Weight vw = be->prepare(Weight::from_f32(var.data(), 1, H, DType::F32));
    DeviceVec z(*be, zh), g(*be, zh.size());
    be->router_select(z.get(), mw, vw, T, H, E, sigma, g.get());
    std::vector<double> want(zh.size());
    for (int64_t t = 0; t < T; t++)
      for (int64_t h = 0; h < H; h++) {
        const float* zr = &zh[size_t((t * H + h) * E)];
        auto norm = [&](int64_t i) { return (zr[i] - mean[size_t(h)]) / std::sqrt(double(var[size_t(h)]) + 1e-5); };
        double max_n = -1e300, denom = 0;
        for (int64_t i = 0; i < E; i++) max_n = std::max(max_n, norm(i));
        const double cut = std::min(max_n, sigma);
        for (int64_t i = 0; i < E; i++)
          if (norm(i) >= cut) denom += std::exp(double(zr[i]));
        for (int64_t i = 0; i < E; i++) want[size_t((t * H + h) * E + i)] = norm(i) >= cut ? std::exp(double(zr[i])) / denom : 0.0;
      }
    const std::vector<float> got = g.host();
    EXPECT_LT(max_rel_err(got, want), 1e-6) << "E=" << E;
    for (size_t i = 0; i < got.size(); i++) ASSERT_EQ(got[i] > 0.0f, want[i] > 0.0) << "selection differs at " << i;
  }
}

// A prepared F32 weight [1, n] of `values` (BatchNorm statistics).
Weight mw_of(Backend& be, const std::vector<float>& values) {
  return be.prepare(Weight::from_f32(values.data(), 1, int64_t(values.size()), DType::F32));
}

// The router of `wp` (prepared by be, H heads of E = wp.rows / H) over the
// tokens x [T, K] against the decode's selection: thresholds calibrated
// (2 BatchNorm units: a few kept per head), exactly at a logit (the 4th
// largest of 12 (token, head) rows: each such entry falls on either side of
// the cut when bounds are ignored, all 12 pass by chance 1 in 4096), and
// above every logit (only the maximum kept). `decode_exact`: the router must
// give the decode's probabilities bit for bit (a few tokens with bf16 weights
// on the CPU: the kept logits are the decode's own dot products).
void expect_router_selects_as_decode(Backend& be, const Weight& wp, const std::vector<float>& xh, int64_t H,
                                     const std::vector<float>& mean, const std::vector<float>& var,
                                     bool bf16_compute, bool decode_exact = false) {
  const int64_t K = wp.cols, T = int64_t(xh.size()) / K, E = wp.rows / H;
  const DType dt = wp.dtype;
  const Weight mw = mw_of(be, mean), vw = mw_of(be, var);
  // The decode's logits, one token at a time.
  std::vector<float> z_decode(size_t(T * H * E));
  for (int64_t t = 0; t < T; t++) {
    DeviceVec x1(be, std::vector<float>(xh.begin() + t * K, xh.begin() + (t + 1) * K)), z1(be, size_t(H * E));
    be.linear(wp, x1.get(), 1, z1.get(), nullptr, /*exact=*/true);
    const std::vector<float> zt = z1.host();
    std::copy(zt.begin(), zt.end(), z_decode.begin() + t * H * E);
  }
  std::vector<double> sigmas = {2.0, 100.0};
  for (int64_t i = 0; i < 12; i++) {
    const int64_t t = (3 * i + 1) % T, h = i % H;
    std::vector<float> row(z_decode.begin() + (t * H + h) * E, z_decode.begin() + (t * H + h + 1) * E);
    std::nth_element(row.begin(), row.begin() + 3, row.end(), std::greater<float>());
    sigmas.push_back(double((row[3] - mean[size_t(h)]) * (1.0f / std::sqrt(var[size_t(h)] + 1e-5f))));
  }
  for (double sigma : sigmas) {
    const bool on_cut = sigma != 2.0 && sigma != 100.0;
    DeviceVec zd(be, z_decode), gd(be, z_decode.size());
    be.router_select(zd.get(), mw, vw, T, H, E, sigma, gd.get());
    DeviceVec x(be, xh), z(be, z_decode.size()), g(be, z_decode.size());
    be.router(wp, x.get(), T, mw, vw, H, E, sigma, z.get(), g.get());
    const std::vector<float> want = gd.host(), got = g.host();
    int64_t kept = 0, differ = 0;
    for (size_t i = 0; i < got.size(); i++) {
      kept += want[i] > 0;
      differ += (got[i] > 0) != (want[i] > 0);
    }
    // Bounded (more tokens, bf16 products, 128 experts or more per head):
    // every logit that may be kept is the decode's dot product too.
    // Elsewhere (float32 GEMMs): the same products, float32 sums in another
    // order (so a logit on the cut may fall on either side).
    const bool bounded = dt == DType::BF16 && bf16_compute && monet::cpu::bf16_products_native() && E >= 128;
    if (decode_exact || bounded) {
      EXPECT_EQ(differ, 0) << "T=" << T << " sigma=" << sigma << ": selections differ";
      EXPECT_EQ(got, want) << "T=" << T << " sigma=" << sigma << ": probabilities differ from the decode's";
    } else if (!on_cut) {
      EXPECT_EQ(differ, 0) << monet::dtype_name(dt) << " sigma=" << sigma << ": selections differ";
      // float32 sums of 2048 terms in other orders (the generic kernels' one accumulator: 1.1e-5)
      EXPECT_LT(max_rel_err(got, std::vector<double>(want.begin(), want.end())), 5e-5)
          << monet::dtype_name(dt) << " sigma=" << sigma;
    }
    if (sigma == 100.0) EXPECT_EQ(kept, T * H) << "only the maximum of each head";
    else if (!on_cut && T > 1)  // (one token's 4 heads may each keep only their maximum at 2 units)
      EXPECT_GT(kept, T * H) << "sigma=" << sigma << " keeps more than one expert per head somewhere";
    else if (on_cut) EXPECT_GE(kept, T * H + 3) << "sigma=" << sigma << " keeps a head's 4 largest";
  }
}

// A router over a batch selects the experts of the float32 logits the
// decode computes (linear(exact) of one token: its row-by-row dot products)
// and gives their probabilities within float32 rounding. On the CPU with
// bf16 products (bf16 weights, 128 experts or more), one bf16 product bounds
// every logit and the decode's dot products compute the ones that may be
// kept: its probabilities bit for bit, for 40 tokens and for 140 (two blocks
// of the dot products' tokens). Over a few tokens (1 and 5: decode steps)
// with bf16 weights, int8 products bound every logit, the same way.
TEST_P(BackendOps, RouterEqualsDecodeLogits) {
  std::mt19937 rng(13);
  const int64_t T = 40, H = 4, E = 128, K = 2048;
  const bool bf16_compute = GetParam().find("/bf16") != std::string::npos;
  const std::vector<float> mean = {0.0f, 0.1f, -0.1f, 0.05f}, var = {9.0f, 8.0f, 12.0f, 10.0f};
  for (DType dt : {DType::BF16, DType::F32}) {
    TestWeight w = random_weight(H * E, K, dt, rng, 1.0f / 45);
    std::vector<float> xh = random_vec(size_t(T * K), rng);
    for (int64_t t = 0; t < T; t++)  // rows of different sizes
      for (int64_t k = 0; k < K; k++) xh[size_t(t * K + k)] *= 0.5f + float(t % 5);
    const Weight wp = be->prepare(w.w);
    expect_router_selects_as_decode(*be, wp, xh, H, mean, var, bf16_compute);
    if (dt == DType::BF16) {  // 140 tokens: the first 40 and 100 more of other sizes
      std::vector<float> more = xh;
      for (int64_t t = 0; t < 100; t++)
        for (int64_t k = 0; k < K; k++) more.push_back(xh[size_t((t % T) * K + (k + 7 * t) % K)] * (0.75f + 0.01f * float(t % 9)));
      expect_router_selects_as_decode(*be, wp, more, H, mean, var, bf16_compute);
    }
    for (int64_t few : {1, 5})
      expect_router_selects_as_decode(*be, wp, std::vector<float>(xh.begin(), xh.begin() + few * K), H, mean, var,
                                      bf16_compute, /*decode_exact=*/dt == DType::BF16);
  }
}

// The same at the bound's worst case: every input's part below its nearest
// bf16 (what the bf16 product drops) as large as rounding to nearest leaves
// it and of the sign of the weights, whose rows share one large component;
// the BatchNorm mean sits at that component's logit, so the dropped part is
// (by estimate) a few BatchNorm units. The
// weight sits at an address where a weight 4096 times smaller was routed
// first (the backend keeps the rows' norms by address: that weight's would
// bound these logits far too tightly).
TEST_P(BackendOps, RouterBoundHoldsAtItsWorstCase) {
  std::mt19937 rng(17);
  const int64_t T = 16, H = 4, E = 128, K = 2048;
  const bool bf16_compute = GetParam().find("/bf16") != std::string::npos;
  const std::vector<float> common = random_vec(size_t(K), rng, 1.0f / 45);
  std::vector<float> wv(size_t(H * E * K));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t r = 0; r < H * E; r++)
    for (int64_t k = 0; k < K; k++) wv[size_t(r * K + k)] = common[size_t(k)] + 0.01f / 45 * nd(rng);
  const Weight w = Weight::from_f32(wv.data(), H * E, K, DType::BF16);
  // x (one token, T times: the BatchNorm statistics are those of a row):
  // the sign of the common component and about its magnitude (the power of
  // two at or under 45 |common_k|, within [2^-6, 2^2]), mantissa bits 22..16
  // clear (the bf16 part) and 15..0 = 0x7FFF: just under half a bf16 unit,
  // rounded down, so the part dropped is about 2^-8 |x|, of x's sign, and
  // about proportional to the weights (Cauchy-Schwarz near equality).
  std::vector<float> xh(size_t(T * K));
  for (int64_t k = 0; k < K; k++) {
    const uint32_t sign = common[size_t(k)] < 0 ? 0x80000000u : 0u;
    const int exponent = std::clamp(int(std::floor(std::log2(45.0 * std::fabs(common[size_t(k)]) + 1e-30))), -6, 2);
    const uint32_t u = sign | uint32_t(127 + exponent) << 23 | 0x7FFFu;
    for (int64_t t = 0; t < T; t++) std::memcpy(&xh[size_t(t * K + k)], &u, 4);
  }
  // BatchNorm statistics of the float32 logits, per head.
  std::vector<float> mean(static_cast<size_t>(H)), var(static_cast<size_t>(H));
  {
    DeviceVec x(*be, xh), z(*be, size_t(T * H * E));
    be->linear(be->prepare(w), x.get(), T, z.get(), nullptr, /*exact=*/true);
    const std::vector<float> zh = z.host();
    for (int64_t h = 0; h < H; h++) {
      double s = 0, s2 = 0;
      for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++) {
          const double v = zh[size_t((t * H + h) * E + e)];
          s += v;
          s2 += v * v;
        }
      const double n = double(T * E), m = s / n;
      mean[size_t(h)] = float(m);
      var[size_t(h)] = float(s2 / n - m * m);
    }
  }
  std::vector<uint8_t> bytes(w.bytes());
  const Weight view = be->prepare(Weight::view(DType::BF16, H * E, K, bytes.data()));
  // First a router of the smaller weight at that address.
  std::vector<float> smaller(wv.size());
  w.rows_to_f32(0, H * E, smaller.data());
  for (float& v : smaller) v /= 4096.0f;  // exact in bf16
  const Weight small = Weight::from_f32(smaller.data(), H * E, K, DType::BF16);
  std::memcpy(bytes.data(), small.data, small.bytes());
  {
    DeviceVec x(*be, xh), z(*be, size_t(T * H * E)), g(*be, size_t(T * H * E));
    be->router(view, x.get(), T, mw_of(*be, mean), mw_of(*be, var), H, E, 2.0, z.get(), g.get());
  }
  std::memcpy(bytes.data(), w.data, w.bytes());
  expect_router_selects_as_decode(*be, view, xh, H, mean, var, bf16_compute);
  // One token (a decode step: int8 bounds, the rows' int8 copy kept by address too).
  std::memcpy(bytes.data(), small.data, small.bytes());
  {
    DeviceVec x(*be, std::vector<float>(xh.begin(), xh.begin() + K)), z(*be, size_t(H * E)), g(*be, size_t(H * E));
    be->router(view, x.get(), 1, mw_of(*be, mean), mw_of(*be, var), H, E, 2.0, z.get(), g.get());
  }
  std::memcpy(bytes.data(), w.data, w.bytes());
  expect_router_selects_as_decode(*be, view, std::vector<float>(xh.begin(), xh.begin() + K), H, mean, var,
                                  bf16_compute, /*decode_exact=*/true);
}

// The bound where it is nearly tight, one logit at a time: the expert at
// the cut reads only inputs whose bf16 rounding drops about 2^-8 of them, of
// the weights' sign (its product is 0.7 of its bound under it); the experts
// above it read inputs that lose 2^-9 and sit far over the threshold, so the
// cut is sigma itself. A bound under the error would drop that expert: a bound
// of 2^-9 instead of 2^-8 per input does.
TEST_P(BackendOps, RouterBoundHoldsNearlyTight) {
  const bool bf16_compute = GetParam().find("/bf16") != std::string::npos;
  const int64_t T = 9, H = 1, E = 128, K = 2048, KA = K - 128;  // inputs [0, KA): set A; the rest: set B
  std::mt19937 rng(19);
  std::bernoulli_distribution coin(0.5);
  std::vector<float> sign(static_cast<size_t>(K)), xh(size_t(T * K));
  for (int64_t k = 0; k < K; k++) {
    sign[size_t(k)] = coin(rng) ? -1.0f : 1.0f;
    // A: 1 + 0x7FFF 2^-23 (its bf16 is 1); B: 1 + 127/128 + 0x7FFF 2^-23 (bf16 1.9921875)
    const uint32_t u = (sign[size_t(k)] < 0 ? 0x80000000u : 0u) | 127u << 23 | (k < KA ? 0u : 0x7Fu << 16) | 0x7FFFu;
    for (int64_t t = 0; t < T; t++) std::memcpy(&xh[size_t(t * K + k)], &u, 4);
  }
  std::vector<float> wv(size_t(E * K), 0.0f);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t k = 0; k < K; k++) {
    if (k < KA) wv[size_t(k)] = sign[size_t(k)] * std::ldexp(1.0f, -10);  // expert 0: at the cut
    else
      for (int64_t e = 1; e <= 3; e++) wv[size_t(e * K + k)] = sign[size_t(k)] * std::ldexp(1.0f, -6) * (1.0f - 0.125f * float(e - 1));
    for (int64_t e = 4; e < E; e++) wv[size_t(e * K + k)] = std::ldexp(1.0f, -14) * nd(rng);  // far under
  }
  const Weight w = be->prepare(Weight::from_f32(wv.data(), E, K, DType::BF16));
  expect_router_selects_as_decode(*be, w, xh, H, {0.0f}, {0.9f}, bf16_compute);
}

TEST_P(BackendOps, SamplingHelpers) {
  std::mt19937 rng(7);
  const int64_t rows = 3, n = 1001;
  std::vector<float> xh = random_vec(size_t(rows * n), rng, 3.0f);
  xh[size_t(1 * n + 17)] = xh[size_t(1 * n + 900)] = 50.0f;  // a tie: the first maximum wins
  DeviceVec x(*be, xh), y(*be, xh.size());
  std::vector<int32_t> best(static_cast<size_t>(rows));
  be->argmax_rows(x.get(), rows, n, best.data());
  for (int64_t r = 0; r < rows; r++)
    EXPECT_EQ(best[size_t(r)], std::max_element(xh.begin() + r * n, xh.begin() + (r + 1) * n) - (xh.begin() + r * n));
  EXPECT_EQ(best[1], 17);
  be->log_softmax_rows(x.get(), rows, n, y.get());
  std::vector<double> want(xh.size());
  for (int64_t r = 0; r < rows; r++) {
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += std::exp(double(xh[size_t(r * n + i)]));
    for (int64_t i = 0; i < n; i++) want[size_t(r * n + i)] = double(xh[size_t(r * n + i)]) - std::log(sum);
  }
  EXPECT_LT(max_rel_err(y.host(), want), 1e-6);
}

// --- the expert mix -------------------------------------------------------

struct ExpertSetup {
  monet::MonetConfig c;
  monet::ExpertWeights w;       // as the backend reads them (v.. transposed, expert-contiguous)
  std::vector<TestWeight> keep; // u1/u, u2, v11, v12, v21, v22 / v, b1, b2 / b: their values
  std::vector<float> bias1, bias2;
};

ExpertSetup make_experts(Backend& be, monet::Decompose decompose, DType dt, std::mt19937& rng, int64_t moe_dim = 6) {
  ExpertSetup s;
  monet::MonetConfig& c = s.c;
  c.hidden_size = 64;  // Q8_0 rows need whole blocks of 32 (u rows have d values; v^T rows d/2)
  c.moe_experts = 24;
  c.moe_heads = 3;
  c.moe_dim = moe_dim;
  c.moe_decompose = decompose;
  c.num_hidden_layers = 1;
  c.moe_groups = 1;
  const int64_t d = c.hidden_size, E = c.moe_experts, m = c.moe_dim;
  auto make = [&](int64_t r, int64_t cols) {
    s.keep.push_back(random_weight(r, cols, dt, rng, 0.3f));
    return be.prepare(s.keep.back().w);
  };
  auto vec = [&](std::vector<float>& host, int64_t n) {
    host = random_vec(size_t(n), rng, 0.1f);
    return be.prepare(Weight::from_f32(host.data(), 1, n, DType::F32));
  };
  s.keep.reserve(16);
  if (decompose == monet::Decompose::Vertical) {
    s.w.u1 = make(E * m / 2, d);
    s.w.u2 = make(E * m / 2, d);
    s.w.u1_bias = vec(s.bias1, E * m / 2);
    s.w.u2_bias = vec(s.bias2, E * m / 2);
    s.w.v11 = make(E * m / 2, d / 2);
    s.w.v12 = make(E * m / 2, d / 2);
    s.w.v21 = make(E * m / 2, d / 2);
    s.w.v22 = make(E * m / 2, d / 2);
    s.w.b1 = make(E, d / 2);
    s.w.b2 = make(E, d / 2);
  } else {
    s.w.u = make(E * m, d);
    s.w.u_bias = vec(s.bias1, E * m);
    s.w.v = make(E * m, d);
    s.w.b = make(E, d);
  }
  return s;
}

// out[t] = sum_h sum_{i,j} M[i,j] g1[h,i] g2[h,j] E_ij(y[t]): the composed
// experts summed one by one (docs/monet.md, "Experts as sums over composed experts").
std::vector<double> explicit_sum(const ExpertSetup& s, const std::vector<float>& y, const std::vector<float>& g1,
                                 const std::vector<float>& g2, int64_t T, const std::vector<const monet::ExpertMask*>& masks) {
  const monet::MonetConfig& c = s.c;
  const bool vd = c.moe_decompose == monet::Decompose::Vertical;
  const int64_t d = c.hidden_size, H = c.moe_heads, E = c.moe_experts, m = c.moe_dim;
  const int64_t hw = vd ? m / 2 : m;
  std::vector<double> out(size_t(T * d), 0.0);
  auto relu2 = [](double v) { return v > 0 ? v * v : 0.0; };
  for (int64_t t = 0; t < T; t++) {
    const float* yt = &y[size_t(t * d)];
    auto expert_in = [&](const TestWeight& u, const std::vector<float>& bias, int64_t i) {
      std::vector<double> x(static_cast<size_t>(hw));
      for (int64_t k = 0; k < hw; k++) {
        double acc = bias[size_t(i * hw + k)];
        for (int64_t e = 0; e < d; e++) acc += double(u.values[size_t((i * hw + k) * d + e)]) * yt[e];
        x[size_t(k)] = relu2(acc);
      }
      return x;
    };
    auto proj = [&](const TestWeight& vt, int64_t e, const std::vector<double>& x, int64_t col) {
      double acc = 0;
      for (int64_t k = 0; k < hw; k++) acc += vt.values[size_t((e * hw + k) * vt.w.cols + col)] * x[size_t(k)];
      return acc;
    };
    std::vector<std::vector<double>> x1(static_cast<size_t>(E)), x2(static_cast<size_t>(E));
    for (int64_t i = 0; i < E; i++) {
      x1[size_t(i)] = expert_in(s.keep[0], s.bias1, i);
      if (vd) x2[size_t(i)] = expert_in(s.keep[1], s.bias2, i);
    }
    for (int64_t i = 0; i < E; i++)
      for (int64_t j = 0; j < E; j++) {
        double pw = 0;
        for (int64_t h = 0; h < H; h++) pw += double(g1[size_t((t * H + h) * E + i)]) * g2[size_t((t * H + h) * E + j)];
        if (masks[size_t(t)]) pw *= masks[size_t(t)]->weight(0, i, j);
        if (pw == 0) continue;
        if (vd) {
          const std::vector<double>& xi = x1[size_t(i)];
          const std::vector<double>& xj = x2[size_t(j)];
          for (int64_t col = 0; col < d / 2; col++) {
            out[size_t(t * d + col)] += pw * (proj(s.keep[2], i, xi, col) + proj(s.keep[3], i, xj, col) +
                                              s.keep[6].values[size_t(i * d / 2 + col)]);
            out[size_t(t * d + d / 2 + col)] += pw * (proj(s.keep[4], j, xi, col) + proj(s.keep[5], j, xj, col) +
                                                      s.keep[7].values[size_t(j * d / 2 + col)]);
          }
        } else {
          const std::vector<double>& xi = x1[size_t(i)];
          for (int64_t col = 0; col < d; col++)
            out[size_t(t * d + col)] += pw * (proj(s.keep[1], j, xi, col) + s.keep[2].values[size_t(j * d + col)]);
        }
      }
  }
  return out;
}

// The arguments of an expert mix of T tokens over s's experts (group 0).
monet::ExpertMixArgs mix_args(const ExpertSetup& s, int64_t T, const float* y, const float* g1, const float* g2,
                              const monet::ExpertMask* const* masks, monet::ExpertPath path, float* out) {
  monet::ExpertMixArgs a;
  a.config = &s.c;
  a.weights = &s.w;
  a.T = T;
  a.y = y;
  a.g1 = g1;
  a.g2 = g2;
  a.masks = masks;
  a.group = 0;
  a.path = path;
  a.out = out;
  return a;
}

// The dense and sparse paths (and Auto) compute the explicit sum, with and
// without masks; tokens of one call may carry different masks (a batch of
// sequences), with removal (scale 0) and amplification (scale 2). The last
// shape (bf16 weights, 96 tokens, expert width 8 / 16) gives the sparse path's
// AMX tiles several 16-token chunks of one expert at the released models' widths.
TEST_P(BackendOps, ExpertMix) {
  std::mt19937 rng(8);
  for (monet::Decompose dec : {monet::Decompose::Vertical, monet::Decompose::Horizontal})
    for (DType dt : kWeightTypes)
      for (auto [T, moe_dim] : {std::pair<int64_t, int64_t>{1, 6}, {5, 6}, {12, 6}, {96, 16}}) {
        if (T == 96 && dt != DType::BF16) continue;
        ExpertSetup s = make_experts(*be, dec, dt, rng, moe_dim);
        const int64_t d = s.c.hidden_size, H = s.c.moe_heads, E = s.c.moe_experts;
        // Sparse probabilities: each head keeps 1-3 experts.
        std::vector<float> g1(size_t(T * H * E), 0.0f), g2(g1.size(), 0.0f);
        std::uniform_int_distribution<int> pick(0, int(E) - 1);
        for (auto* g : {&g1, &g2})
          for (int64_t th = 0; th < T * H; th++) {
            const int n = 1 + int(th % 3);
            for (int k = 0; k < n; k++) (*g)[size_t(th * E + pick(rng))] += 1.0f / float(n);
          }
        const std::vector<float> yh = random_vec(size_t(T * d), rng);
        // Masks touching experts token 0 routes to: a pair removed, a row amplified, a column removed.
        std::vector<int> used1, used2;
        for (int64_t i = 0; i < E; i++) {
          if (g1[size_t(i)] + g1[size_t(E + i)] + g1[size_t(2 * E + i)] > 0) used1.push_back(int(i));
          if (g2[size_t(i)] + g2[size_t(E + i)] + g2[size_t(2 * E + i)] > 0) used2.push_back(int(i));
        }
        monet::ExpertMask mask = monet::ExpertMask::none(s.c);
        mask.add_expert(0, int64_t(used1.front()) * E + used2.front());
        mask.add_component(0, 1, used1.back(), 2.0f);
        mask.add_component(0, 2, used2.back());
        DeviceVec y(*be, yh), G1(*be, g1), G2(*be, g2), out(*be, size_t(T * d));
        for (int masking = 0; masking < 3; masking++) {  // none, all tokens, every other token
          std::vector<const monet::ExpertMask*> masks(static_cast<size_t>(T), nullptr);
          for (int64_t t = 0; t < T; t++)
            if (masking == 1 || (masking == 2 && t % 2 == 0)) masks[size_t(t)] = &mask;
          const std::vector<double> want = explicit_sum(s, yh, g1, g2, T, masks);
          std::vector<double> dense_out;
          // Q8_0 u products take int8 activations (both paths): the explicit
          // sum of the values they see.
          const std::vector<double> want_q8 =
              dt == DType::Q8_0 ? explicit_sum(s, q8_activations(yh.data(), T * d), g1, g2, T, masks) : want;
          for (monet::ExpertPath path : {monet::ExpertPath::Dense, monet::ExpertPath::Sparse, monet::ExpertPath::Auto}) {
            be->expert_mix(mix_args(s, T, y.get(), G1.get(), G2.get(), masking ? masks.data() : nullptr, path, out.get()));
            // bf16 compute rounds the inputs of the large products (u, and the
            // coefficients of v) to bf16: 2^-8 relative per input.
            EXPECT_LT(max_rel_err(out.host(), want_q8), bf16_compute ? 2e-2 : 1e-5)
                << (dec == monet::Decompose::Vertical ? "VD " : "HD ") << monet::dtype_name(dt) << " T=" << T
                << " masking=" << masking << " path=" << int(path);
            // bf16 weights: both paths take the same bf16-rounded inputs, so
            // they differ by float32 sum order only (batch invariance).
            const std::vector<float> got = out.host();
            if (path == monet::ExpertPath::Dense) dense_out.assign(got.begin(), got.end());
            else if (bf16_compute && dt == DType::BF16)
              EXPECT_LT(max_rel_err(got, dense_out), 1e-5)
                  << "sparse vs dense " << (dec == monet::Decompose::Vertical ? "VD" : "HD") << " T=" << T
                  << " masking=" << masking;
          }
          if (masking == 1) {
            const std::vector<double> unmasked = explicit_sum(s, yh, g1, g2, T, std::vector<const monet::ExpertMask*>(size_t(T)));
            double diff = 0;
            for (size_t i = 0; i < want.size(); i++) diff = std::max(diff, std::abs(want[i] - unmasked[i]));
            EXPECT_GT(diff, 1e-4) << "the mask changed nothing";
          }
        }
      }
}

// same_routing (a router group's later layers): with other g buffers than
// the previous call's the mix is computed afresh; with the same ones the CPU
// backend reuses the entries it made from them then (what forward promises
// by the flag), while the inputs y are this call's.
TEST_P(BackendOps, ExpertMixSameRouting) {
  std::mt19937 rng(10);
  for (monet::Decompose dec : {monet::Decompose::Vertical, monet::Decompose::Horizontal})
    for (int64_t T : {1, 12, 40}) {
      ExpertSetup s = make_experts(*be, dec, DType::F32, rng, 16);
      const int64_t d = s.c.hidden_size, H = s.c.moe_heads, E = s.c.moe_experts;
      auto routing = [&] {
        std::vector<float> g(size_t(T * H * E), 0.0f);
        std::uniform_int_distribution<int> pick(0, int(E) - 1);
        for (int64_t th = 0; th < T * H; th++)
          for (int k = 0; k < 2; k++) g[size_t(th * E + pick(rng))] += 0.5f;
        return g;
      };
      const std::vector<float> g1 = routing(), g2 = routing(), h1 = routing(), h2 = routing();
      const std::vector<float> yh = random_vec(size_t(T * d), rng), yh2 = random_vec(size_t(T * d), rng);
      const std::vector<const monet::ExpertMask*> no_masks(static_cast<size_t>(T), nullptr);
      DeviceVec y(*be, yh), y2(*be, yh2), G1(*be, g1), G2(*be, g2), H1(*be, h1), H2(*be, h2), out(*be, size_t(T * d));
      auto mix = [&](const DeviceVec& x, const DeviceVec& a1, const DeviceVec& a2, bool same, int64_t tokens) {
        monet::ExpertMixArgs args = mix_args(s, tokens, x.get(), a1.get(), a2.get(), nullptr, monet::ExpertPath::Auto, out.get());
        args.same_routing = same;
        be->expert_mix(args);
        return out.host();
      };
      const double tol = bf16_compute ? 2e-2 : 1e-5;
      const std::string what = std::string(dec == monet::Decompose::Vertical ? "VD" : "HD") + " T=" + std::to_string(T);
      EXPECT_LT(max_rel_err(mix(y, G1, G2, false, T), explicit_sum(s, yh, g1, g2, T, no_masks)), tol) << what;
      EXPECT_LT(max_rel_err(mix(y, H1, H2, true, T), explicit_sum(s, yh, h1, h2, T, no_masks)), tol)
          << what << ": other buffers than the previous call's";
      // G1, G2 now hold h1, h2: the previous call read H1, H2, so they are read again.
      be->from_host(G1.get(), h1.data(), h1.size() * 4);
      be->from_host(G2.get(), h2.data(), h2.size() * 4);
      EXPECT_LT(max_rel_err(mix(y2, G1, G2, true, T), explicit_sum(s, yh2, h1, h2, T, no_masks)), tol) << what;
      // The same buffers again, their contents changed behind the flag's back:
      // the entries of h1, h2 are reused, with this call's inputs.
      be->from_host(G1.get(), g1.data(), g1.size() * 4);
      be->from_host(G2.get(), g2.data(), g2.size() * 4);
      EXPECT_LT(max_rel_err(mix(y, G1, G2, true, T), explicit_sum(s, yh, h1, h2, T, no_masks)), tol)
          << what << ": the entries were not reused";
      EXPECT_LT(max_rel_err(mix(y, G1, G2, false, T), explicit_sum(s, yh, g1, g2, T, no_masks)), tol) << what;
      EXPECT_LT(max_rel_err(mix(y, G1, H2, true, T), explicit_sum(s, yh, g1, h2, T, no_masks)), tol)
          << what << ": another side-2 buffer than the previous call's";
      if (T > 1) {  // the same buffers over fewer tokens, then over all again: made afresh each time
        mix(y, H1, H2, false, T);
        const std::vector<float> got = mix(y, G1, G2, true, T - 1);
        auto head = [&](const std::vector<float>& v, int64_t per) { return std::vector<float>(v.begin(), v.begin() + (T - 1) * per); };
        const std::vector<double> want = explicit_sum(s, head(yh, d), head(g1, H * E), head(g2, H * E), T - 1,
                                                      std::vector<const monet::ExpertMask*>(size_t(T - 1), nullptr));
        EXPECT_LT(max_rel_err(head(got, d), want), tol) << what << ": fewer tokens";
        EXPECT_LT(max_rel_err(mix(y, G1, G2, true, T), explicit_sum(s, yh, g1, g2, T, no_masks)), tol)
            << what << ": more tokens than the previous call's";
      }
    }
}

// The expert mix gives the same bits for any number of threads: the decode's
// v slices go to threads in fixed parts summed in order, more tokens split
// the columns, and every u product is one thread's.
TEST_P(BackendOps, ExpertMixSameForAnyThreads) {
  std::mt19937 rng(9);
  std::vector<std::unique_ptr<Backend>> teams;
  for (int threads : {1, 3}) teams.push_back(make(GetParam(), threads));
  for (monet::Decompose dec : {monet::Decompose::Vertical, monet::Decompose::Horizontal})
    for (DType dt : {DType::BF16, DType::Q8_0, DType::F32})
      for (int64_t T : {1, 5, 8, 12, 40}) {
        ExpertSetup s = make_experts(*be, dec, dt, rng, 16);
        const int64_t d = s.c.hidden_size, H = s.c.moe_heads, E = s.c.moe_experts;
        std::vector<float> g1(size_t(T * H * E), 0.0f), g2(g1.size(), 0.0f);
        std::uniform_int_distribution<int> pick(0, int(E) - 1);
        for (auto* g : {&g1, &g2})
          for (int64_t th = 0; th < T * H; th++)
            for (int k = 0; k < 3; k++) (*g)[size_t(th * E + pick(rng))] += 1.0f / 3.0f;
        const std::vector<float> yh = random_vec(size_t(T * d), rng);
        std::vector<std::vector<float>> outs;
        for (Backend* team : {be.get(), teams[0].get(), teams[1].get()}) {
          DeviceVec y(*team, yh), G1(*team, g1), G2(*team, g2), out(*team, size_t(T * d));
          team->expert_mix(mix_args(s, T, y.get(), G1.get(), G2.get(), nullptr, monet::ExpertPath::Sparse, out.get()));
          outs.push_back(out.host());
        }
        for (size_t i = 1; i < outs.size(); i++)
          EXPECT_EQ(std::memcmp(outs[0].data(), outs[i].data(), outs[0].size() * sizeof(float)), 0)
              << (dec == monet::Decompose::Vertical ? "VD " : "HD ") << monet::dtype_name(dt) << " T=" << T
              << ": 2 threads and " << (i == 1 ? 1 : 3) << " differ";
      }
}

INSTANTIATE_TEST_SUITE_P(All, BackendOps, ::testing::ValuesIn(backends()),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           std::string n = p.param;
                           std::replace(n.begin(), n.end(), '/', '_');
                           return n;
                         });

// The online softmax's exponentials of every level against std::exp: within
// 2 ulp where exp's value is a normal float, 0 or under float32's normal
// range below that; the sum within float32 rounding of the values'.
TEST(KernelSets, ExpShiftedSumAgainstStdExp) {
  std::mt19937 rng(10);
  std::uniform_real_distribution<float> ud(-95.0f, 0.0f);
  for (const auto& choice : monet::cpu::kernel_sets()) {
    if (!choice.supported) continue;
    for (int64_t n : {1, 15, 16, 17, 100}) {
      const float shift = 3.5f;
      std::vector<float> x(static_cast<size_t>(n));
      for (float& v : x) v = shift + ud(rng);
      x[0] = shift;  // exp(0) = 1 exactly
      if (n > 3) x[1] = shift - 87.2f, x[2] = shift - 87.4f, x[3] = shift - 1e-3f;
      std::vector<float> got = x;
      const float sum = choice.set->exp_shifted_sum(got.data(), n, shift);
      double want_sum = 0;
      for (int64_t i = 0; i < n; i++) {
        const float want = std::exp(x[size_t(i)] - shift);
        want_sum += want;
        if (want >= std::numeric_limits<float>::min())
          EXPECT_LE(std::abs(got[size_t(i)] - want), 2 * (std::nextafter(want, 1e30f) - want))
              << choice.set->name << " t=" << x[size_t(i)] - shift;
        else
          EXPECT_LT(got[size_t(i)], std::numeric_limits<float>::min()) << choice.set->name;
      }
      EXPECT_EQ(got[0], 1.0f) << choice.set->name;
      EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum) << choice.set->name << " n=" << n;
    }
  }
}

// The Q8_0 row kernels of every level this CPU runs against plain loops:
// activation blocks bit for bit, block dot products (odd block counts for
// the tails, w = -128, which only a file can hold, all-zero blocks and
// subnormal ones, which quantize to zero),
// and axpy (one row and several) over column ranges that cut blocks.
TEST(Q8Kernels, EveryLevelAgainstPlainLoops) {
  std::mt19937 rng(9);
  for (const auto& choice : monet::cpu::kernel_sets()) {
    if (!choice.supported) continue;
    const monet::cpu::Q8Kernels& k = choice.set->q8_0;
    for (int64_t nb : {1, 2, 3, 8, 64, 65, 128, 129, 130}) {  // up to and past the one-token loop's longest rows (64 steps)
      const int64_t K = 32 * nb, N = 5;
      std::vector<float> x = random_vec(size_t(8 * K), rng, 3.0f);
      std::fill(x.begin() + K, x.begin() + K + 32, 0.0f);  // token 1's first block is zero: d = 0
      for (int64_t i = 0; i < 32; i++)  // token 2's first block is subnormal: 1 / d would overflow
        x[size_t(2 * K + i)] = float(i % 3) * std::numeric_limits<float>::min() * 0.4f;
      std::vector<monet::cpu::BlockQ8Act> xq(size_t(8 * nb));
      for (int64_t t = 0; t < 8; t++) k.quantize(x.data() + t * K, xq.data() + t * nb, K);
      const std::vector<float> xv = q8_activations(x.data(), 8 * K);
      for (int64_t i = 0; i < 8 * K; i++)
        ASSERT_EQ(xq[size_t(i / 32)].d * float(xq[size_t(i / 32)].q[i % 32]), xv[size_t(i)])
            << choice.set->name << " activation " << i;
      TestWeight w = random_weight(N, K, DType::Q8_0, rng);
      std::vector<uint8_t> bytes(static_cast<const uint8_t*>(w.w.data), static_cast<const uint8_t*>(w.w.data) + w.w.bytes());
      monet::BlockQ8_0* blocks = reinterpret_cast<monet::BlockQ8_0*>(bytes.data());
      blocks[0].q[3] = -128;  // |w| = 128 must still multiply right
      w.values[3] = monet::f16_to_f32(blocks[0].d) * -128.0f;
      std::vector<float> first_token;  // token 0's sums with T = 2
      for (int64_t T : {2, 3, 4, 5, 6, 7, 8, 1}) {
        const monet::cpu::BlockQ8Act* xs[8];
        for (int64_t t = 0; t < T; t++) xs[t] = xq.data() + t * nb;
        std::vector<float> y(size_t(T * N));
        k.dot_rows(bytes.data(), w.w.row_bytes(), N, xs, T, K, y.data(), N);
        EXPECT_LT(max_rel_err(y, reference_products(w.values, xv, T, N, K)), 1e-6 * std::sqrt(double(K))) << choice.set->name << " T=" << T << " K=" << K;
        if (T == 2) first_token.assign(y.begin(), y.begin() + N);
        // Decode's own loop (one token) makes the same sums in the same order.
        if (T == 1)
          for (int64_t n = 0; n < N; n++) EXPECT_EQ(y[size_t(n)], first_token[size_t(n)]) << choice.set->name << " K=" << K << " row " << n;
      }
      // The token laid out once, then applied to rows (decode's expert slices): the same sums again.
      // (The levels with VNNI have the loop.)
      if (std::string(choice.set->name) == "avx512bf16") ASSERT_TRUE(k.prepare_token && k.dot_rows_token);
      if (k.prepare_token) {
        auto token = std::make_unique<monet::cpu::Q8Token>();
        const bool fits = nb / 2 <= monet::cpu::kQ8TokenSteps;
        ASSERT_EQ(k.prepare_token(xq.data(), nb, token.get()), fits) << choice.set->name << " K=" << K;
        if (fits) {
          std::vector<float> y(size_t(N), 0.0f);
          for (const void* next : {static_cast<const void*>(nullptr), static_cast<const void*>(bytes.data())}) {
            k.dot_rows_token(bytes.data(), w.w.row_bytes(), N, *token, y.data(), next);
            for (int64_t n = 0; n < N; n++) EXPECT_EQ(y[size_t(n)], first_token[size_t(n)]) << choice.set->name << " K=" << K << " row " << n;
          }
        }
      }
      for (auto [c0, c1] : {std::pair<int64_t, int64_t>{0, K}, {5, K - 3}, {32, K}, {7, 9}}) {
        if (c1 <= c0) continue;
        std::vector<float> out = random_vec(size_t(K), rng);
        std::vector<double> want(out.begin(), out.end());
        k.axpy(bytes.data() + w.w.row_bytes(), 0.7f, out.data(), c0, c1);
        for (int64_t c = c0; c < c1; c++) want[size_t(c)] += 0.7 * double(w.values[size_t(K + c)]);
        EXPECT_LT(max_rel_err(out, want), 1e-6) << choice.set->name << " axpy [" << c0 << ", " << c1 << ")";
        // Several rows at once (a zero coefficient skipped; some rows to prefetch, one not): the same sums
        // as axpy row after row, bit for bit.
        const void* rows[N];
        const void* next[N];
        const float coefs[N] = {0.7f, 0.0f, -1.3f, 0.25f, 2.0f};
        for (int64_t n = 0; n < N; n++) {
          rows[n] = bytes.data() + size_t(n) * w.w.row_bytes();
          next[n] = n == 2 ? nullptr : rows[N - 1 - n];
        }
        std::vector<float> one_by_one = random_vec(size_t(K), rng), together = one_by_one;
        for (int64_t n = 0; n < N; n++)
          if (coefs[n] != 0.0f) k.axpy(rows[n], coefs[n], one_by_one.data(), c0, c1);
        k.axpy_multi(rows, coefs, N, together.data(), c0, c1, c0 == 0 ? next : nullptr);
        for (int64_t c = 0; c < K; c++)
          ASSERT_EQ(together[size_t(c)], one_by_one[size_t(c)]) << choice.set->name << " axpy_multi [" << c0 << ", " << c1 << ") column " << c;
        // The same rows for 1..11 tokens at once (prefill's expert slices; past
        // kSmallBatch in groups), each token's coefficients its own (zeros
        // among them): axpy_multi's values.
        for (int64_t nt = 1; nt <= monet::cpu::kSmallBatch + 3; nt++) {
          std::vector<float> token_coefs(size_t(nt * N));
          for (float& v : token_coefs) v = std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? 0.0f : float(rng() % 200) / 50.0f - 2.0f;
          std::vector<std::vector<float>> each(static_cast<size_t>(nt)), all(static_cast<size_t>(nt));
          float* outs[monet::cpu::kSmallBatch + 3];
          for (int64_t t = 0; t < nt; t++) {
            each[size_t(t)] = random_vec(size_t(K), rng);
            all[size_t(t)] = each[size_t(t)];
            k.axpy_multi(rows, token_coefs.data() + t * N, N, each[size_t(t)].data(), c0, c1, nullptr);
            outs[t] = all[size_t(t)].data();
          }
          k.axpy_multi_tokens(rows, token_coefs.data(), N, outs, nt, c0, c1);
          for (int64_t t = 0; t < nt; t++)
            for (int64_t c = 0; c < K; c++)
              ASSERT_EQ(all[size_t(t)][size_t(c)], each[size_t(t)][size_t(c)])
                  << choice.set->name << " axpy_multi_tokens nt=" << nt << " token " << t << " [" << c0 << ", " << c1 << ") column " << c;
        }
      }
    }
  }
}

// The AMX tile kernels of the sparse experts against plain loops over the
// same bf16 values: the u products (expert widths 3, 8 and 16, depths with an
// odd number of 32-value steps, partial tiles) and the v products (odd and
// even row counts, column counts with and without a last single block).
TEST(AmxKernels, AgainstPlainLoops) {
  namespace amx = monet::cpu::amx;
  if (!amx::usable()) GTEST_SKIP() << "this CPU has no AMX tiles (the sparse experts use the row kernels)";
  std::mt19937 rng(10);
  auto bits = [](const TestWeight& t) { return static_cast<const uint16_t*>(t.w.data); };
  for (int64_t w : {3, 8, 16})
    for (int64_t K : {32, 96, 128, 160, 2048}) {
      const TestWeight u = random_weight(w, K, DType::BF16, rng), yw = random_weight(16, K, DType::BF16, rng);
      const std::vector<float>& y = yw.values;
      const uint16_t* yb = bits(yw);
      std::vector<uint32_t> packed(size_t(K / 2 * w));
      amx::pack_u(bits(u), u.w.row_bytes(), w, K, packed.data());
      for (int64_t nt : {1, 5, 16}) {
        const uint16_t* rows[16];
        for (int64_t t = 0; t < nt; t++) rows[t] = yb + (15 - t) * K;  // any rows, any order
        std::vector<float> c(size_t(16 * w));
        amx::dot_tile(rows, nt, packed.data(), w, K, c.data());
        std::vector<float> got(c.begin(), c.begin() + nt * w), y_rows;
        for (int64_t t = 0; t < nt; t++) y_rows.insert(y_rows.end(), y.begin() + (15 - t) * K, y.begin() + (16 - t) * K);
        EXPECT_LT(max_rel_err(got, reference_products(u.values, y_rows, nt, w, K)), 1e-6)
            << "dot_tile w=" << w << " K=" << K << " nt=" << nt;
      }
    }
  for (int64_t n_rows : {7, 17, 32})
    for (int64_t N : {16, 48, 80, 96}) {
      const TestWeight vw = random_weight(n_rows, N, DType::BF16, rng);
      const std::vector<float>& v = vw.values;
      const int64_t pair_rows = (n_rows + 1) / 2, lda = 2 * pair_rows;
      const TestWeight aw = random_weight(16, lda, DType::BF16, rng);
      std::vector<float> a = aw.values;
      std::vector<uint16_t> ab(bits(aw), bits(aw) + 16 * lda);
      for (int64_t t = 0; t < 16; t++)  // the odd row's partner column holds zeros (as the callers')
        if (n_rows % 2) {
          ab[size_t(t * lda + n_rows)] = 0;
          a[size_t(t * lda + n_rows)] = 0.0f;
        }
      std::vector<const uint16_t*> rows;
      for (int64_t j = 0; j < n_rows; j++) rows.push_back(bits(vw) + j * N);
      std::vector<uint32_t> packed(size_t(pair_rows * N));
      amx::pack_pairs(rows.data(), n_rows, N, packed.data());
      for (int64_t nt : {1, 9, 16}) {
        std::vector<float> out = random_vec(size_t(16 * (N + 3)), rng);  // rows N + 3 apart
        std::vector<double> want(out.begin(), out.end());
        float* outs[16];
        for (int64_t t = 0; t < nt; t++) {
          outs[t] = out.data() + (15 - t) * (N + 3);
          for (int64_t n = 0; n < N; n++)
            for (int64_t j = 0; j < n_rows; j++)
              want[size_t((15 - t) * (N + 3) + n)] += double(a[size_t(t * lda + j)]) * v[size_t(j * N + n)];
        }
        std::vector<float> products(size_t(amx::kAxpyScratchFloats));
        amx::axpy_tile(ab.data(), lda, pair_rows, packed.data(), N, outs, nt, products.data());
        EXPECT_LT(max_rel_err(out, want), 1e-6) << "axpy_tile rows=" << n_rows << " N=" << N << " nt=" << nt;
      }
    }
}

// The int8 tiles' Q8_0 products (linear's prefill, the sparse experts' u
// slices) against plain loops of the same arithmetic: each block's int32 sum
// exact, then y = fma(float(sum), dw * dx, y) block after block, so the same
// bits. Row counts of a full and a partial tile, token counts of partial
// tiles, odd block counts, the next rows prefetched or not.
TEST(AmxKernels, Q8AgainstPlainLoops) {
  namespace amx = monet::cpu::amx;
  if (!amx::usable()) GTEST_SKIP() << "this CPU has no AMX tiles (Q8_0 products use the row kernels)";
  std::mt19937 rng(11);
  const monet::cpu::KernelSet& k = monet::cpu::select_kernels("");
  for (int64_t nb : {1, 2, 3, 64})
    for (int64_t nrows : {16, 8, 5}) {
      const int64_t K = 32 * nb;
      TestWeight w = random_weight(nrows + 16, K, DType::Q8_0, rng);  // 16 more: the next rows
      const uint8_t* bytes = static_cast<const uint8_t*>(w.w.data);
      for (int64_t T : {1, 5, 16, 17, 40}) {
        std::vector<float> x = random_vec(size_t(T * K), rng, 2.0f);
        std::vector<monet::cpu::BlockQ8Act> xq(size_t(T * nb));
        for (int64_t t = 0; t < T; t++) k.q8_0.quantize(x.data() + t * K, xq.data() + t * nb, K);
        std::vector<uint8_t> packed(size_t(amx::q8_tokens_bytes(T, nb)));
        amx::pack_q8_tokens(xq.data(), T, nb, packed.data());
        std::vector<float> want(size_t(T * (nrows + 3)), -1.0f);
        for (int64_t t = 0; t < T; t++)
          for (int64_t r = 0; r < nrows; r++) {
            const monet::BlockQ8_0* row = reinterpret_cast<const monet::BlockQ8_0*>(bytes + size_t(r) * w.w.row_bytes());
            float y = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
              int32_t sum = 0;
              for (int64_t i = 0; i < 32; i++) sum += int32_t(row[b].q[i]) * int32_t(xq[size_t(t * nb + b)].q[i]);
              y = std::fma(float(sum), monet::f16_to_f32(row[b].d) * xq[size_t(t * nb + b)].d, y);
            }
            want[size_t(t * (nrows + 3) + r)] = y;
          }
        std::vector<float> scratch(size_t(amx::q8_tile_scratch_floats(nb)));
        for (const void* next : {static_cast<const void*>(nullptr), static_cast<const void*>(bytes + size_t(nrows) * w.w.row_bytes())}) {
          std::vector<float> y(want.size(), -1.0f);  // rows nrows + 3 apart: the 3 past each row untouched
          amx::q8_dot_rows_tile(bytes, w.w.row_bytes(), nrows, packed.data(), T, nb, y.data(), nrows + 3, next, scratch.data());
          for (size_t i = 0; i < y.size(); i++)
            ASSERT_EQ(y[i], want[i]) << "nb=" << nb << " rows=" << nrows << " T=" << T << " at " << i;
        }
        // An expert slice (its rows packed once) and up to 16 of the tokens
        // in any order (prefill's sparse u products): the same sums.
        std::vector<uint8_t> slice(size_t(amx::q8_slice_bytes(nb)));
        amx::pack_q8_slice(bytes, w.w.row_bytes(), nrows, nb, slice.data());
        const int64_t nt = std::min<int64_t>(T, 16);
        const monet::cpu::BlockQ8Act* xs[16];
        for (int64_t k = 0; k < nt; k++) xs[k] = xq.data() + (T - 1 - k) * nb;  // the last tokens, backwards
        std::vector<float> out(size_t(nt * nrows));
        amx::q8_dot_slice_tile(xs, nt, slice.data(), nrows, nb, out.data(), scratch.data());
        for (int64_t k = 0; k < nt; k++)
          for (int64_t r = 0; r < nrows; r++)
            ASSERT_EQ(out[size_t(k * nrows + r)], want[size_t((T - 1 - k) * (nrows + 3) + r)])
                << "slice nb=" << nb << " rows=" << nrows << " token " << T - 1 - k;
      }
    }
}

TEST(Backend, RefusesUnknownDeviceAndKernels) {
  monet::BackendOptions o;
  o.device = "cuda";
  EXPECT_THROW(monet::make_backend(o), monet::Error);
  o.device = "cpu";
  o.cpu_kernels = "sse9";
  EXPECT_THROW(monet::make_backend(o), monet::Error);
}

}  // namespace
