// monet_bench: prefill and greedy decode timings of the monet library,
// printed as one JSON object. Used by bench/bench_cpu.py.
//   monet_bench --model DIR [--threads N] [--prompt P] [--decode N] [--batch B] [--repeat R] [--compute auto|f32|bf16]
//               [--huge-pages 0|1]
//               [--ids 1,5,9] [--logits last|all] [--routing 0|1] [--warmup W] [--experts auto|dense|sparse]
// With --batch B, B sequences (each its own P-token prompt and cache) decode
// together: one batched forward step per token position, B tokens each.
// --ids: the prompt of batch 1 (instead of a pseudo-random one); --logits and
// --routing: what the prefill returns (all logits and the router
// probabilities: `monet forward`'s outputs, bench/bench_python.py). --experts:
// the expert path of every forward (auto: chosen per layer from the density).
// Timings are the best of R repeats, after W untimed ones (a process's first
// passes compile matrix-product primitives for new row counts).
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

int32_t argmax(const float* v, int64_t n) { return int32_t(std::max_element(v, v + n) - v); }

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, compute = "auto", ids_text, logits_mode = "last", experts = "auto";
  int threads = 0, routing = 0, huge_pages = 0;
  int64_t prompt = 64, decode = 32, batch = 1, repeat = 1, warmup = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model")) model_dir = argv[i + 1];
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--prompt")) prompt = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--decode")) decode = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch")) batch = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--repeat")) repeat = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--compute")) compute = argv[i + 1];
    else if (!std::strcmp(argv[i], "--ids")) ids_text = argv[i + 1];
    else if (!std::strcmp(argv[i], "--logits")) logits_mode = argv[i + 1];
    else if (!std::strcmp(argv[i], "--routing")) routing = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--warmup")) warmup = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--experts")) experts = argv[i + 1];
    else if (!std::strcmp(argv[i], "--huge-pages")) huge_pages = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  std::vector<int32_t> given_ids;
  for (size_t at = 0; at < ids_text.size();) {
    const size_t comma = std::min(ids_text.find(',', at), ids_text.size());
    given_ids.push_back(int32_t(std::atoll(ids_text.substr(at, comma - at).c_str())));
    at = comma + 1;
  }
  if (!given_ids.empty()) prompt = int64_t(given_ids.size());
  if (model_dir.empty() || prompt < 1 || decode < 1 || batch < 1 || repeat < 1 || warmup < 0 ||
      (logits_mode != "last" && logits_mode != "all") ||
      (experts != "auto" && experts != "dense" && experts != "sparse") || (!given_ids.empty() && batch != 1)) {
    std::fprintf(stderr, "usage: monet_bench --model DIR [--threads N] [--prompt P] [--decode N] [--batch B] [--repeat R] "
                         "[--compute auto|f32|bf16] [--ids 1,5,9] [--logits last|all] [--routing 0|1] [--warmup W] "
                         "[--experts auto|dense|sparse] [--huge-pages 0|1]\n");
    return 2;
  }
  try {
    auto t_load = std::chrono::steady_clock::now();
    monet::LoadOptions lo;
    lo.threads = threads;
    lo.compute = compute;
    lo.huge_pages = huge_pages != 0;
    auto model = monet::Model::load(model_dir, lo);
    const double load_s = seconds_since(t_load);
    const monet::MonetConfig& c = model->config();
    const int64_t V = c.vocab_size;
    // Sequence b's prompt: a fixed pseudo-random text, different per sequence.
    auto prompt_ids = [&](int64_t b) {
      if (!given_ids.empty()) return given_ids;
      std::vector<int32_t> ids(static_cast<size_t>(prompt));
      for (int64_t i = 0; i < prompt; i++) ids[size_t(i)] = int32_t((i * 7919 + b * 104729 + 13) % V);
      return ids;
    };

    // warm-up: a dense-path forward touches every weight page of the mapping,
    // then one sparse decode step
    {
      std::vector<float> logits;
      monet::ForwardOptions fo;
      fo.all_logits = false;
      const std::vector<int32_t> ids = prompt_ids(0);
      const int64_t n = std::min<int64_t>(prompt, 16);
      monet::KvCache warm = model->new_cache(n + 1);
      model->forward(warm, ids.data(), n, logits, fo);
      int32_t t = argmax(logits.data(), V);
      model->forward(warm, &t, 1, logits, fo);
    }

    monet::BatchOptions bo;
    bo.expert_path = experts == "dense"    ? monet::ExpertPath::Dense
                     : experts == "sparse" ? monet::ExpertPath::Sparse
                                           : monet::ExpertPath::Auto;
    double best_prefill = 1e300, best_decode = 1e300;
    double expert_fraction = 0;
    for (int64_t rep = -warmup; rep < repeat; rep++) {
      const bool timed = rep >= 0;
      std::vector<monet::KvCache> caches;
      std::vector<std::vector<int32_t>> prompts;
      std::vector<std::vector<float>> logits(static_cast<size_t>(batch));
      for (int64_t b = 0; b < batch; b++) {
        caches.push_back(model->new_cache(prompt + decode + 1));
        prompts.push_back(prompt_ids(b));
      }
      // Prefill: every sequence's prompt in one batched call.
      std::vector<monet::Sequence> seqs(static_cast<size_t>(batch));
      std::vector<monet::RouterCapture> prefill_routing(static_cast<size_t>(batch));
      for (int64_t b = 0; b < batch; b++) {
        seqs[size_t(b)].cache = &caches[size_t(b)];
        seqs[size_t(b)].ids = prompts[size_t(b)].data();
        seqs[size_t(b)].n = prompt;
        seqs[size_t(b)].logits = logits_mode == "all" ? monet::Logits::All : monet::Logits::Last;
        seqs[size_t(b)].logits_out = &logits[size_t(b)];
        seqs[size_t(b)].routing = routing ? &prefill_routing[size_t(b)] : nullptr;
      }
      auto t0 = std::chrono::steady_clock::now();
      model->forward_batch(seqs, bo);
      if (timed) best_prefill = std::min(best_prefill, seconds_since(t0));
      for (int64_t b = 0; b < batch; b++) {  // decode from the last position's logits
        seqs[size_t(b)].logits = monet::Logits::Last;
        logits[size_t(b)].erase(logits[size_t(b)].begin(), logits[size_t(b)].end() - V);
      }

      // Decode, counting the expert slices each token's routers selected (the
      // capture is a copy of H*E floats per router layer: negligible).
      std::vector<int32_t> next(static_cast<size_t>(batch));
      for (int64_t b = 0; b < batch; b++) next[size_t(b)] = argmax(logits[size_t(b)].data(), V);
      int64_t kept = 0, slots = 0;
      double decode_s = 0;
      for (int64_t s = 0; s < decode; s++) {
        std::vector<monet::RouterCapture> caps(static_cast<size_t>(batch));
        for (int64_t b = 0; b < batch; b++) {
          seqs[size_t(b)].ids = &next[size_t(b)];
          seqs[size_t(b)].n = 1;
          seqs[size_t(b)].routing = &caps[size_t(b)];
        }
        auto ts = std::chrono::steady_clock::now();
        model->forward_batch(seqs, bo);
        decode_s += seconds_since(ts);
        for (const monet::RouterCapture& cap : caps)
          for (size_t r = 0; r < cap.g1.size(); r++)
            for (const auto* g : {&cap.g1[r], &cap.g2[r]})
              for (int64_t i = 0; i < c.moe_experts; i++) {
                bool on = false;
                for (int64_t h = 0; h < c.moe_heads; h++) on |= (*g)[size_t(h * c.moe_experts + i)] > 0;
                kept += on;
                slots++;
              }
        for (int64_t b = 0; b < batch; b++) next[size_t(b)] = argmax(logits[size_t(b)].data(), V);
      }
      if (timed) best_decode = std::min(best_decode, decode_s);
      expert_fraction = double(kept) / double(std::max<int64_t>(slots, 1));
    }
    std::printf("{\"load_s\": %.3f, \"batch\": %lld, \"prefill_tokens\": %lld, \"prefill_s\": %.4f, "
                "\"prefill_tok_s\": %.2f, \"decode_tokens\": %lld, \"decode_s\": %.4f, \"decode_tok_s\": %.3f, "
                "\"expert_fraction\": %.4f, \"weight_bytes\": %zu, \"huge_page_bytes\": %zu, \"threads\": %d, \"repeat\": %lld, \"backend\": \"%s\"}\n",
                load_s, (long long)batch, (long long)(prompt * batch), best_prefill, double(prompt * batch) / best_prefill,
                (long long)(decode * batch), best_decode, double(decode * batch) / best_decode, expert_fraction,
                model->weight_bytes(), model->file_huge_page_bytes(), model->threads(), (long long)repeat, model->backend_name().c_str());
  } catch (const monet::Error& e) {
    std::fprintf(stderr, "monet_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
