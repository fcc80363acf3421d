// monet_q8_bench: the CPU backend's linear layer with Q8_0 weights against
// BF16 weights, at the Monet-VD-1.4B lm_head shape (32000 x 2048, larger
// than the caches: decode reads it from memory) and an attention shape
// (2048 x 2048), for 1 and 8 tokens. Prints a table: time, bytes read per
// second, and the Q8_0 / BF16 speed-up against the limit of a memory-bound
// product, the ratio of bytes (2 / (34/32) = 1.88). Best of --repeat runs.
//   monet_q8_bench [--threads N] [--repeat R]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "monet/error.h"
#include "monet/tensor.h"

int main(int argc, char** argv) {
  int threads = 1, repeat = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--repeat")) repeat = std::atoi(argv[i + 1]);
  }
  try {
    monet::BackendOptions o;
    o.threads = threads;
    auto be = monet::make_backend(o);
    std::printf("backend %s; best of %d (a shared machine: noisy)\n\n", be->name().c_str(), repeat);
    std::printf("| shape | tokens | bf16 ms | q8_0 ms | bf16 GB/s | q8_0 GB/s | q8_0 speed-up | memory-bound limit |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    for (auto [N, K] : {std::pair<int64_t, int64_t>{32000, 2048}, {2048, 2048}}) {
      std::vector<float> v(size_t(N * K)), x(size_t(8 * K)), y(size_t(8 * N));
      for (float& a : v) a = nd(rng);
      for (float& a : x) a = nd(rng);
      const monet::Weight wb = monet::Weight::from_f32(v.data(), N, K, monet::DType::BF16);
      const monet::Weight wq = monet::Weight::from_f32(v.data(), N, K, monet::DType::Q8_0);
      for (int64_t T : {1, 8}) {
        auto best = [&](const monet::Weight& w) {
          double b = 1e30;
          for (int r = 0; r < repeat; r++) {
            const auto t0 = std::chrono::steady_clock::now();
            be->linear(w, x.data(), T, y.data());
            b = std::min(b, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
          }
          return b;
        };
        const double tb = best(wb), tq = best(wq);
        std::printf("| %lld x %lld | %lld | %.3f | %.3f | %.1f | %.1f | %.2fx | %.2fx |\n", (long long)N, (long long)K,
                    (long long)T, tb * 1e3, tq * 1e3, double(wb.bytes()) / tb / 1e9, double(wq.bytes()) / tq / 1e9,
                    tb / tq, double(wb.bytes()) / double(wq.bytes()));
      }
    }
  } catch (const monet::Error& e) {
    std::fprintf(stderr, "monet_q8_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
