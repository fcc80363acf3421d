// monet_bench: prefill and batch-1 greedy decode timings of the monet library,
// printed as one JSON object. Used by bench/bench_cpu.py.
//   monet_bench --model DIR [--threads N] [--prompt P] [--decode N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "monet/error.h"
#include "monet/model.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int32_t argmax(const std::vector<float>& v) {
  return int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir;
  int threads = 0;
  int64_t prompt = 64, decode = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model")) model_dir = argv[i + 1];
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--prompt")) prompt = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--decode")) decode = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (model_dir.empty() || prompt < 1 || decode < 1) {
    std::fprintf(stderr, "usage: monet_bench --model DIR [--threads N] [--prompt P] [--decode N]\n");
    return 2;
  }
  try {
    auto t_load = std::chrono::steady_clock::now();
    auto model = monet::Model::load(model_dir, {threads});
    const double load_s = seconds_since(t_load);
    const monet::MonetConfig& c = model->config();
    std::vector<int32_t> ids(static_cast<size_t>(prompt));
    for (int64_t i = 0; i < prompt; i++) ids[size_t(i)] = int32_t((i * 7919 + 13) % c.vocab_size);
    std::vector<float> logits;
    monet::ForwardOptions last;
    last.all_logits = false;

    // warm-up: a dense-path forward (long enough for the dense expert GEMMs)
    // touches every weight page of the mapping, then one sparse decode step
    {
      const int64_t n = std::min<int64_t>(prompt, std::max<int64_t>(16, last.dense_expert_min_tokens));
      monet::KvCache warm = model->new_cache(n + 1);
      model->forward(warm, ids.data(), n, logits, last);
      int32_t t = argmax(logits);
      model->forward(warm, &t, 1, logits, last);
    }
    monet::KvCache cache = model->new_cache(prompt + decode + 1);
    auto t0 = std::chrono::steady_clock::now();
    model->forward(cache, ids.data(), prompt, logits, last);
    const double prefill_s = seconds_since(t0);

    // decode, counting the expert slices each token's routers selected (the
    // capture is a copy of H*E floats per router layer: negligible)
    int64_t kept = 0, slots = 0;
    int32_t next = argmax(logits);
    double decode_s = 0;
    for (int64_t s = 0; s < decode; s++) {
      monet::RouterCapture cap;
      monet::ForwardOptions fo = last;
      fo.capture = &cap;
      auto ts = std::chrono::steady_clock::now();
      model->forward(cache, &next, 1, logits, fo);
      decode_s += seconds_since(ts);
      for (size_t r = 0; r < cap.g1.size(); r++)
        for (const auto* g : {&cap.g1[r], &cap.g2[r]})
          for (int64_t i = 0; i < c.moe_experts; i++) {
            bool on = false;
            for (int64_t h = 0; h < c.moe_heads; h++) on |= (*g)[size_t(h * c.moe_experts + i)] > 0;
            kept += on;
            slots++;
          }
      next = argmax(logits);
    }
    std::printf("{\"load_s\": %.3f, \"prefill_tokens\": %lld, \"prefill_s\": %.4f, \"prefill_tok_s\": %.2f, "
                "\"decode_tokens\": %lld, \"decode_s\": %.4f, \"decode_tok_s\": %.3f, "
                "\"expert_fraction\": %.4f, \"weight_bytes\": %zu, \"threads\": %d}\n",
                load_s, (long long)prompt, prefill_s, prompt / prefill_s, (long long)decode, decode_s,
                decode / decode_s, double(kept) / double(std::max<int64_t>(slots, 1)), model->weight_bytes(),
                model->threads());
  } catch (const monet::Error& e) {
    std::fprintf(stderr, "monet_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
