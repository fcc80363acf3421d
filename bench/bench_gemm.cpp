// monet_gemm_bench: the CPU backend's GEMMs at the Monet-VD-1.4B prefill
// shapes against the machine's measured arithmetic peaks (float32 FMA,
// AVX-512-BF16 dot products, AMX bf16 tiles), and OpenBLAS sgemm on float32
// weights beside them; the decode's GEMV against the copy bandwidth; the
// routers' bounded products against the exact ones. Prints tables; best of
// --repeat runs (--routers: the routers' table only).
//   monet_gemm_bench [--threads N] [--repeat R] [--m 128,512] [--routers]
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "backend/backend.h"
#include "backend/cpu/gemm.h"
#include "backend/cpu/kernels.h"
#include "monet/tensor.h"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Seconds of the fastest of `runs` calls of fn, after one untimed call.
template <class Fn>
double best_seconds(int runs, Fn fn) {
  fn();
  double best = 1e30;
  for (int r = 0; r < runs; r++) {
    const double t0 = now();
    fn();
    best = std::min(best, now() - t0);
  }
  return best;
}

// Peak arithmetic: independent FMA (f32) or vdpbf16ps (bf16) chains in
// registers, one chain set per thread. FLOP/s counting a multiply-add as 2.
double peak_flops(int threads, bool bf16) {
#if defined(__AVX512F__)
  const int64_t iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    const double t0 = now();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      __m512 acc[12];
      for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps(float(i) * 1e-9f);
      const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
      for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++) {
#if defined(__AVX512BF16__)
          if (bf16) {
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b));
            continue;
          }
#endif
          acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
        }
      for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
    }
    const double t = now() - t0;
    if (sink == 42.0f) std::printf(" ");
    const double flop_per_op = bf16 ? 64.0 : 32.0;  // 16 lanes x (2 bf16 products | 1 fma) x 2
    best = std::max(best, double(threads) * double(iters) * 12 * flop_per_op / t);
  }
  return best;
#else
  return 0;
#endif
}

#if defined(__AMX_BF16__)
// AMX tiles need the kernel's permission for their register state (this
// benchmark's own process; oneDNN asks the same in the library).
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Peak of TDPBF16PS: four independent C tiles (16x16 f32) from two A and two
// B tiles (16x32 bf16). Each instruction: 16*16*32 multiply-adds.
double amx_peak_flops(int threads) {
  if (!amx_permitted()) return 0;
  const int64_t iters = 5'000'000;
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    const double t0 = now();
#pragma omp parallel num_threads(threads)
    {
      alignas(64) TileConfig cfg;
      for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
      }
      __asm__ __volatile__("" : : "r"(&cfg) : "memory");  // GCC does not see ldtilecfg read cfg
      _tile_loadconfig(&cfg);
      alignas(64) static thread_local uint16_t ab[16 * 32];
      for (int i = 0; i < 16 * 32; i++) ab[i] = 0x3f80;  // 1.0
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      _tile_loadd(4, ab, 64); _tile_loadd(5, ab, 64); _tile_loadd(6, ab, 64); _tile_loadd(7, ab, 64);
      for (int64_t it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_release();
    }
    best = std::max(best, double(threads) * double(iters) * 4 * 16 * 16 * 32 * 2 / (now() - t0));
  }
  return best;
}
#endif

// Decode reads every weight once per token: the streamed GEMV (one token,
// bf16 rows [2048 x 2048] as q/k/v/o, 48 matrices = 384 MiB, more than any
// cache) against the copy bandwidth of the same threads.
void decode_gemv(const monet::cpu::KernelSet& k, int threads, int repeat) {
  const int64_t N = 2048, K = 2048, mats = 48;
  std::vector<uint16_t> w(size_t(mats * N * K), 0x3c00);  // bf16 1/128
  std::vector<float> x(static_cast<size_t>(K), 1.0f), y(static_cast<size_t>(N));
  const float* xs[1] = {x.data()};
  const monet::cpu::RowKernels* rk = k.rows(monet::DType::BF16);
  const size_t row_bytes = size_t(K) * 2;
  auto gemv_all = [&] {
    for (int64_t m = 0; m < mats; m++) {
      const uint8_t* base = reinterpret_cast<const uint8_t*>(w.data()) + size_t(m * N) * row_bytes;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t b = 0; b < N / 64; b++)
        rk->dot_rows(base + size_t(b * 64) * row_bytes, row_bytes, 64, xs, 1, K, y.data() + b * 64, N);
    }
  };
  std::vector<uint8_t> src(size_t(1) << 30, 1), dst(size_t(1) << 30);
  auto copy_all = [&] {
    const size_t chunk = src.size() / size_t(threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) std::memcpy(dst.data() + size_t(t) * chunk, src.data() + size_t(t) * chunk, chunk);
  };
  const int runs = std::max(repeat, 5);
  const double gemv_gbs = double(w.size() * 2) / best_seconds(runs, gemv_all) / 1e9;
  const double copy_gbs = 2.0 * double(src.size()) / best_seconds(runs, copy_all) / 1e9;
  std::printf("\ndecode GEMV (1 token, bf16 2048 x 2048, 48 matrices): %.1f GB/s read; copy bandwidth %.1f GB/s "
              "(read + write): %.0f %%\n", gemv_gbs, copy_gbs, 100.0 * gemv_gbs / copy_gbs);
}

// The routers of a prefill (T tokens): the CPU backend's router (from
// K = kBoundedRouterMinK and 128 experts on, one bf16 product, bounds, the
// logits that may be kept in float32) against the exact product + selection
// (Backend::router), from the default model's shape to the 1.4B's. Logits
// ~ N(0, 1), the threshold keeping about moe_topk of E per head as
// calibrated routers do.
void routers(int threads, int repeat) {
  struct Shape {
    const char* what;
    int64_t K, H, E;
    double sigma;
  };
  const Shape shapes[] = {{"default model K 256 H 4 E 64", 256, 4, 64, 1.15},
                          {"K 1024 H 4 E 64", 1024, 4, 64, 1.15},
                          {"K 1536 H 4 E 64", 1536, 4, 64, 1.15},
                          {"K 1024 H 8 E 512", 1024, 8, 512, 2.15},
                          {"K 1536 H 8 E 512", 1536, 8, 512, 2.15},
                          {"K 2048 H 8 E 128", 2048, 8, 128, 1.53},
                          {"K 2048 H 8 E 256", 2048, 8, 256, 1.86},
                          {"Monet-VD-1.4B K 2048 H 8 E 512", 2048, 8, 512, 2.15}};
  monet::BackendOptions opts;
  opts.threads = threads;
  std::unique_ptr<monet::Backend> be = monet::make_backend(opts);
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::printf("\n| %-32s | %5s | %12s | %12s | %6s |\n", "router (T tokens)", "T", "exact ms", "backend ms", "ratio");
  std::printf("|%s|------:|-------------:|-------------:|-------:|\n", std::string(34, '-').c_str());
  for (const Shape& s : shapes) {
    const int64_t N = s.H * s.E, T = 512;
    std::vector<float> wf(size_t(N * s.K)), x(size_t(T * s.K)), z(size_t(T * N)), g(size_t(T * N));
    for (float& v : wf) v = nd(rng) / std::sqrt(float(s.K));
    for (float& v : x) v = nd(rng);
    const monet::Weight w = be->prepare(monet::Weight::from_f32(wf.data(), N, s.K, monet::DType::BF16));
    const std::vector<float> mean(size_t(s.H), 0.0f), var(size_t(s.H), 1.0f);
    const monet::Weight mw = be->prepare(monet::Weight::from_f32(mean.data(), 1, s.H, monet::DType::F32));
    const monet::Weight vw = be->prepare(monet::Weight::from_f32(var.data(), 1, s.H, monet::DType::F32));
    auto time = [&](auto fn) { return 1e3 * best_seconds(std::max(repeat, 5), fn); };
    const double exact = time([&] { be->Backend::router(w, x.data(), T, mw, vw, s.H, s.E, s.sigma, z.data(), g.data()); });
    const double backend = time([&] { be->router(w, x.data(), T, mw, vw, s.H, s.E, s.sigma, z.data(), g.data()); });
    std::printf("| %-32s | %5lld | %12.3f | %12.3f | %5.2fx |\n", s.what, (long long)T, exact, backend, exact / backend);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int threads = omp_get_num_procs(), repeat = 3;
  std::vector<int64_t> ms = {128, 512};
  bool routers_only = false;
  for (int i = 1; i < argc; i++) {
    const char* opt = argv[i];
    if (!std::strcmp(opt, "--routers")) {
      routers_only = true;
      continue;
    }
    const bool takes_value = !std::strcmp(opt, "--threads") || !std::strcmp(opt, "--repeat") || !std::strcmp(opt, "--m");
    if (!takes_value || i + 1 == argc) {
      std::fprintf(stderr, "usage: monet_gemm_bench [--threads N] [--repeat R] [--m 128,512] [--routers]\n");
      return 2;
    }
    const char* value = argv[++i];
    if (!std::strcmp(opt, "--threads")) threads = std::atoi(value);
    else if (!std::strcmp(opt, "--repeat")) repeat = std::atoi(value);
    else {
      ms.clear();
      for (const char* p = value; *p;) {
        char* end = nullptr;
        ms.push_back(std::strtoll(p, &end, 10));
        if (end == p || ms.back() < 1) {
          std::fprintf(stderr, "--m: \"%s\" is not a list of row counts like 128,512\n", value);
          return 2;
        }
        p = *end == ',' ? end + 1 : end;
      }
    }
  }
  if (threads < 1 || repeat < 1) {
    std::fprintf(stderr, "--threads and --repeat take a positive number\n");
    return 2;
  }
  if (routers_only) {
    routers(threads, repeat);
    return 0;
  }
  const monet::cpu::KernelSet& k = monet::cpu::select_kernels("");
  if (std::strncmp(k.name, "avx512", 6) != 0) {
    std::fprintf(stderr, "monet_gemm_bench measures AVX-512 peaks; this CPU runs the %s kernels\n", k.name);
    return 1;
  }
  const double peak_f32 = peak_flops(threads, false);
  const double peak_dp = peak_flops(threads, true);
#if defined(__AMX_BF16__)
  const double peak_amx = monet::cpu::bf16_tiles() ? amx_peak_flops(threads) : 0;
#else
  const double peak_amx = 0;
#endif
  // The bf16 products' peak: AMX tiles where oneDNN uses them, else the AVX-512-BF16 dot product.
  const double peak_bf16 = peak_amx > 0 ? peak_amx : peak_dp;
  std::printf("kernels %s, %d threads; measured peaks: f32 FMA %.1f GFLOP/s, AVX-512-BF16 dot product %.1f GFLOP/s, "
              "AMX bf16 tiles %.1f GFLOP/s\n\n", k.name, threads, peak_f32 / 1e9, peak_dp / 1e9, peak_amx / 1e9);
  struct Shape {
    const char* what;
    int64_t N, K;
    bool transposed;
  };
  // Monet-VD-1.4B: d 2048, H*E 4096, E*m/2 4096 (VD u1/u2 rows, v11.. as [E*m/2, d/2]), V 32000
  const Shape shapes[] = {{"q/k/v/o proj  N 2048 K 2048", 2048, 2048, true},
                          {"router w1/w2  N 4096 K 2048", 4096, 2048, true},
                          {"u1/u2 dense   N 4096 K 2048", 4096, 2048, true},
                          {"v11.. dense   N 1024 K 4096", 1024, 4096, false},
                          {"lm_head       N 32000 K 2048", 32000, 2048, true}};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::printf("| %-30s | %5s | %-16s | %9s | %7s |\n", "shape", "M", "path", "GFLOP/s", "of peak");
  std::printf("|%s|------:|%s|----------:|--------:|\n", std::string(32, '-').c_str(), std::string(18, '-').c_str());
  for (const Shape& s : shapes) {
    const int64_t rows = s.transposed ? s.N : s.K, cols = s.transposed ? s.K : s.N;
    std::vector<float> wf(size_t(rows * cols));
    for (float& v : wf) v = nd(rng) * 0.02f;
    const monet::Weight wb = monet::Weight::from_f32(wf.data(), rows, cols, monet::DType::BF16);
    const monet::Weight w32 = monet::Weight::from_f32(wf.data(), rows, cols, monet::DType::F32);
    for (int64_t M : ms) {
      std::vector<float> a(size_t(M * s.K)), c(size_t(M * s.N));
      for (float& v : a) v = nd(rng);
      const double flop = 2.0 * double(M) * double(s.N) * double(s.K);
      auto time = [&](auto fn) { return flop / best_seconds(repeat, fn); };
      auto row = [&](const char* path, double flops, double peak) {
        std::printf("| %-30s | %5lld | %-16s | %9.1f | %6.1f%% |\n", s.what, (long long)M, path, flops / 1e9,
                    peak > 0 ? 100.0 * flops / peak : 0.0);
      };
      if (monet::cpu::bf16_products_native())
        row("bf16 weights, bf16", time([&] {
              monet::cpu::gemm(k, threads, monet::cpu::GemmCompute::BF16, a.data(), s.K, M, wb, s.transposed, c.data(),
                               s.N, false);
            }), peak_bf16);
      row("bf16 weights, f32", time([&] {
            monet::cpu::gemm(k, threads, monet::cpu::GemmCompute::F32, a.data(), s.K, M, wb, s.transposed, c.data(), s.N,
                             false);
          }), peak_f32);
      row("f32 weights, f32", time([&] {
            monet::cpu::gemm(k, threads, monet::cpu::GemmCompute::F32, a.data(), s.K, M, w32, s.transposed, c.data(),
                             s.N, false);
          }), peak_f32);
      openblas_set_num_threads(threads);
      row("OpenBLAS sgemm", time([&] {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, s.transposed ? CblasTrans : CblasNoTrans, int(M), int(s.N),
                        int(s.K), 1.0f, a.data(), int(s.K), wf.data(), s.transposed ? int(s.K) : int(s.N), 0.0f,
                        c.data(), int(s.N));
          }), peak_f32);
    }
  }
  decode_gemv(k, threads, repeat);
  routers(threads, repeat);
  return 0;
}
