// monet._monet: the Python extension over the monet library (nanobind).
// python/monet/__init__.py is the API users see; this module does the
// compute with the GIL released and hands results over as numpy arrays that
// own the library's buffers (no copy).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "monet/error.h"
#include "monet/evaluate.h"
#include "monet/generate.h"
#include "monet/image.h"
#include "monet/index.h"
#include "monet/interp.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// A forward call runs at most this many tokens at once through the KV cache,
// so that Ctrl-C is seen between chunks of a long sequence (the result is
// the same as one call, to float rounding).
constexpr int64_t kForwardChunk = 512;

// Seconds the library spent in this thread's last forward pass (run_forward,
// GIL released): bench/bench_python.py pairs it with the Python call's wall
// time to measure the package's overhead on the same call.
thread_local double last_forward_seconds = 0;

// Thrown where a Python signal handler raised (Ctrl-C: KeyboardInterrupt);
// the Python error stays set and is raised once the GIL is held again.
struct Interrupted {};

void check_signals() {
  nb::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw Interrupted{};
}

// Runs f with the GIL released.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  try {
    nb::gil_scoped_release nogil;
    return f();
  } catch (const Interrupted&) {
    throw nb::python_error();
  }
}

// A numpy array owning `values` (moved, not copied).
template <class T>
nb::object to_numpy(std::vector<T>&& values, std::vector<size_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(owned->data(), shape.size(), shape.data(), owner));
}

// An image given from Python: a file path, or the bytes of a file.
struct ImageInput {
  std::string name;           // the path, or "image N" for bytes
  std::vector<uint8_t> data;  // the bytes; empty: read the file `name`
};

std::vector<ImageInput> image_inputs(const std::vector<std::tuple<std::string, std::optional<nb::bytes>>>& given) {
  std::vector<ImageInput> out;
  for (const auto& [name, bytes] : given) {
    ImageInput in{name, {}};
    if (bytes) {
      const auto* p = static_cast<const uint8_t*>(bytes->data());
      in.data.assign(p, p + bytes->size());
      if (in.data.empty()) throw monet::Error(name + ": no bytes");
    }
    out.push_back(std::move(in));
  }
  return out;
}

// The vision tower of a VisionMonet (llava_monet) checkpoint, loaded on the
// first image; shared by the copies of a Model (a stream holds one).
struct VisionState {
  std::mutex mu;
  monet::VisionLoadOptions options;
  std::unique_ptr<monet::VisionTower> tower;
};

struct Model {
  std::shared_ptr<const monet::Model> model;
  std::shared_ptr<VisionState> vision = std::make_shared<VisionState>();
  std::shared_ptr<const monet::Tokenizer> tokenizer;
  std::string tokenizer_error;  // why there is no tokenizer (raised on use)
  std::string dir;

  const monet::Tokenizer& tok() const {
    if (!tokenizer) throw monet::Error(tokenizer_error);
    return *tokenizer;
  }

  const monet::VisionTower& tower() const {
    std::lock_guard<std::mutex> lock(vision->mu);
    if (!vision->tower)
      vision->tower = monet::VisionTower::load(dir, model->config().hidden_size, model->backend(), vision->options);
    return *vision->tower;
  }

  // A prompt with images: ids with monet::kImageToken markers and each
  // image's projected patch embeddings (no GIL needed).
  monet::MultimodalPrompt image_prompt(const std::vector<int32_t>& ids, const std::vector<ImageInput>& images) const {
    const monet::VisionTower& t = tower();
    std::vector<std::vector<float>> embeds;
    for (const ImageInput& in : images) {
      const monet::Image image = in.data.empty() ? monet::decode_image_file(in.name)
                                                 : monet::decode_image(in.data.data(), in.data.size(), in.name);
      embeds.push_back(t.embed_image(image));
    }
    return monet::build_multimodal_prompt(*model, ids, embeds, t.tokens_per_image());
  }

  // The mask of a JSON text (monet.Mask), checked against this model.
  std::optional<monet::ExpertMask> mask_of(const std::optional<std::string>& json, const std::string& source) const {
    if (!json) return std::nullopt;
    return monet::ExpertMask::parse_json(*json, source, model->config());
  }
};

Model load_model(const std::string& dir, int threads, const std::string& compute, const std::string& vision_tower,
                 const std::string& projector, bool huge_pages) {
  if (threads < 0) throw monet::Error("threads must be >= 0 (0: all cores), got " + std::to_string(threads));
  Model m;
  m.dir = dir;
  m.vision->options.vision_tower_dir = vision_tower;
  m.vision->options.projector_file = projector;
  without_gil([&] {
    monet::LoadOptions lo;
    lo.threads = threads;
    lo.compute = compute;
    lo.huge_pages = huge_pages;
    m.model = monet::Model::load(dir, lo);
    try {
      m.tokenizer = monet::Tokenizer::load_dir(dir);
    } catch (const monet::Error& e) {
      m.tokenizer_error = std::string("no tokenizer: ") + e.what();
    }
  });
  return m;
}

// What one forward pass computed, before it becomes numpy arrays.
struct ForwardResult {
  std::vector<float> logits;                 // [rows, V]
  int64_t logit_rows = 0;
  std::vector<std::vector<float>> g1, g2;    // per router layer [T, H, E]
  std::vector<std::vector<float>> captures;  // per capture name [T, d]
};

// The forward pass of `ids` from an empty cache, in chunks of kForwardChunk
// tokens with a signal check between them. logits: "all", "last" or "none";
// capture: intermediates by name ("resid_pre.{l}", ...: monet::ActivationCapture);
// embeds: [T, d] input embeddings used instead of the ids' (a prompt with images).
ForwardResult run_forward(const Model& m, const std::vector<int32_t>& ids, const std::string& logits_mode,
                          bool routing, const monet::ExpertMask* mask,
                          const std::vector<std::string>& capture_names = {}, const float* embeds = nullptr) {
  const monet::MonetConfig& c = m.model->config();
  const int64_t T = int64_t(ids.size()), R = c.num_router_layers(), d = c.hidden_size;
  if (logits_mode != "all" && logits_mode != "last" && logits_mode != "none")
    throw monet::Error("logits must be \"all\", \"last\" or None, got \"" + logits_mode + "\"");
  if (T == 0) throw monet::Error("forward: no tokens given");
  if (embeds && T > c.max_position_embeddings)  // as `monet vision`
    throw monet::Error("the prompt is " + std::to_string(T) + " tokens with its images, over max_position_embeddings = " +
                       std::to_string(c.max_position_embeddings));
  ForwardResult r;
  const auto t0 = std::chrono::steady_clock::now();
  without_gil([&] {
    const bool chunked = T > kForwardChunk;
    monet::KvCache cache = m.model->new_cache(T);
    monet::BatchOptions bo;
    // Only routing wanted: stop after the last router (one call: routing_only
    // does not fill the cache for a next chunk; captures may lie beyond it).
    bo.routing_only = logits_mode == "none" && !chunked && capture_names.empty();
    if (routing) {
      r.g1.resize(size_t(R));
      r.g2.resize(size_t(R));
    }
    r.captures.resize(capture_names.size());
    std::vector<float> chunk_logits;
    for (int64_t start = 0; start < T; start += kForwardChunk) {
      check_signals();
      const int64_t n = std::min(kForwardChunk, T - start);
      const bool last_chunk = start + n == T;
      monet::RouterCapture capture;
      monet::ActivationCapture activations;
      activations.names = capture_names;
      std::vector<monet::Sequence> seqs(1);
      monet::Sequence& sq = seqs[0];
      sq.cache = &cache;
      sq.ids = ids.data() + start;
      sq.embeds = embeds ? embeds + start * d : nullptr;
      sq.n = n;
      sq.logits = logits_mode == "all" ? monet::Logits::All
                  : logits_mode == "last" && last_chunk ? monet::Logits::Last : monet::Logits::None;
      sq.logits_out = &chunk_logits;
      sq.routing = routing ? &capture : nullptr;
      sq.activations = capture_names.empty() ? nullptr : &activations;
      sq.mask = mask;
      m.model->forward_batch(seqs, bo);
      for (size_t k = 0; k < capture_names.size(); k++) {
        std::vector<float>& got = activations.values[capture_names[k]];
        if (!chunked) r.captures[k] = std::move(got);
        else r.captures[k].insert(r.captures[k].end(), got.begin(), got.end());
      }
      if (logits_mode == "all") {
        if (!chunked) r.logits = std::move(chunk_logits);
        else r.logits.insert(r.logits.end(), chunk_logits.begin(), chunk_logits.end());
        chunk_logits.clear();
        r.logit_rows = T;
      } else if (logits_mode == "last" && last_chunk) {
        r.logits = std::move(chunk_logits);
        r.logit_rows = 1;
      }
      for (size_t l = 0; routing && l < size_t(R); l++) {
        if (!chunked) {
          r.g1[l] = std::move(capture.g1[l]);
          r.g2[l] = std::move(capture.g2[l]);
        } else {
          r.g1[l].insert(r.g1[l].end(), capture.g1[l].begin(), capture.g1[l].end());
          r.g2[l].insert(r.g2[l].end(), capture.g2[l].begin(), capture.g2[l].end());
        }
      }
    }
  });
  last_forward_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

nb::dict forward(const Model& m, std::vector<int32_t> ids, const std::string& logits_mode, bool routing,
                 const std::vector<std::string>& capture_names, const std::optional<std::string>& mask_json,
                 const std::string& mask_source,
                 const std::vector<std::tuple<std::string, std::optional<nb::bytes>>>& images) {
  if (logits_mode == "none" && !routing && capture_names.empty())
    throw monet::Error("forward: nothing to compute (logits=None, routing=False, no capture)");
  for (size_t k = 0; k < capture_names.size(); k++)
    for (size_t k2 = 0; k2 < k; k2++)
      if (capture_names[k] == capture_names[k2]) throw monet::Error("capture \"" + capture_names[k] + "\" named twice");
  const auto mask = m.mask_of(mask_json, mask_source);
  // With images: the ids of the prompt (image positions kImageToken) and its embeddings, as `monet vision`.
  monet::MultimodalPrompt mp;
  if (!images.empty()) {
    const std::vector<ImageInput> inputs = image_inputs(images);
    without_gil([&] { mp = m.image_prompt(ids, inputs); });
    ids = mp.ids;
  }
  ForwardResult r = run_forward(m, ids, logits_mode, routing, mask ? &*mask : nullptr, capture_names,
                                images.empty() ? nullptr : mp.embeds.data());
  const monet::MonetConfig& c = m.model->config();
  const size_t T = ids.size(), H = size_t(c.moe_heads), E = size_t(c.moe_experts);
  nb::dict out;
  if (!images.empty()) out["ids"] = to_numpy(std::move(mp.ids), {T});
  if (logits_mode != "none") out["logits"] = to_numpy(std::move(r.logits), {size_t(r.logit_rows), size_t(c.vocab_size)});
  for (size_t l = 0; l < r.g1.size(); l++) {
    const std::string layer = std::to_string(int64_t(l) * c.moe_groups);
    out[("router." + layer + ".g1").c_str()] = to_numpy(std::move(r.g1[l]), {T, H, E});
    out[("router." + layer + ".g2").c_str()] = to_numpy(std::move(r.g2[l]), {T, H, E});
  }
  for (size_t k = 0; k < capture_names.size(); k++)
    out[capture_names[k].c_str()] = to_numpy(std::move(r.captures[k]), {T, size_t(c.hidden_size)});
  return out;
}

// Per token and router group, the experts above `threshold` (and, with a
// mask, those it removed): as `monet experts --json`.
using Activations = std::vector<std::tuple<int64_t, int32_t, int32_t, float>>;
struct TokenGroups {
  std::vector<Activations> kept, removed;  // [group]
};

nb::list experts(const Model& m, std::vector<int32_t> ids, float threshold,
                 const std::optional<std::string>& mask_json, const std::string& mask_source,
                 const std::vector<std::tuple<std::string, std::optional<nb::bytes>>>& images) {
  if (!(threshold >= 0.0f)) throw monet::Error("threshold must be >= 0, got " + std::to_string(threshold));
  const auto mask = m.mask_of(mask_json, mask_source);
  // With images (as `monet experts --image`): every image patch is a position of its own.
  monet::MultimodalPrompt mp;
  int64_t grid = 0;  // patches per side; negative: patch 0 is the CLS token
  if (!images.empty()) {
    const std::vector<ImageInput> inputs = image_inputs(images);
    without_gil([&] {
      mp = m.image_prompt(ids, inputs);
      grid = m.tower().clip().grid();
      if (m.tower().llava().select_feature == "cls_patch") grid = -grid;
    });
    ids = mp.ids;
  }
  ForwardResult r = run_forward(m, ids, "none", true, mask ? &*mask : nullptr, {},
                                images.empty() ? nullptr : mp.embeds.data());
  const monet::MonetConfig& c = m.model->config();
  const int64_t H = c.moe_heads, E = c.moe_experts;
  std::vector<TokenGroups> tokens(ids.size());
  without_gil([&] {
    monet::RouterCapture cap;
    cap.g1 = std::move(r.g1);
    cap.g2 = std::move(r.g2);
    auto rows = [](const std::vector<monet::ExpertActivation>& list) {
      Activations out;
      for (const auto& a : list) out.emplace_back(a.id, a.i, a.j, a.prob);
      return out;
    };
    for (size_t t = 0; t < ids.size(); t++)
      for (size_t g = 0; g < cap.g1.size(); g++) {
        const monet::TokenExperts te = monet::token_experts(cap, t, g, H, E, threshold, mask ? &*mask : nullptr);
        tokens[t].kept.push_back(rows(te.kept));
        tokens[t].removed.push_back(rows(te.removed));
      }
  });
  nb::list out;
  for (size_t t = 0; t < ids.size(); t++) {
    nb::list groups;
    for (size_t g = 0; g < tokens[t].kept.size(); g++) {
      nb::dict jg;
      jg["group"] = g;
      jg["count"] = tokens[t].kept[g].size();
      jg["experts"] = nb::cast(tokens[t].kept[g]);
      if (mask) jg["removed"] = nb::cast(tokens[t].removed[g]);
      groups.append(jg);
    }
    nb::dict jt;
    jt["position"] = t;
    jt["id"] = ids[t];
    if (!images.empty() && mp.image[t] >= 0) {
      // An image patch: where it lies in the image's grid of patches (row, column from the top left).
      const int64_t g = std::abs(grid), k = mp.patch[t] - (grid < 0 ? 1 : 0);
      jt["image"] = mp.image[t];
      jt["patch"] = mp.patch[t];
      if (k >= 0) {
        jt["row"] = k / g;
        jt["col"] = k % g;
      }
    } else {
      jt["piece"] = m.tokenizer ? m.tokenizer->token_text(ids[t]) : std::to_string(ids[t]);
    }
    jt["groups"] = groups;
    out.append(jt);
  }
  return out;
}

struct Sampling {  // monet::SamplingParams and max_tokens, as Python sets them
  float temperature = 0.8f, top_p = 0.95f, min_p = 0.0f, repeat_penalty = 1.0f;
  int top_k = 40, repeat_last_n = 64;
  uint64_t seed = 0;
  int64_t max_tokens = 64;
  std::vector<int32_t> stop_ids;  // more ids that end the generation (a chat format's end of turn)
};

monet::GenerateOptions generate_options(const Model& m, const Sampling& s, const std::vector<std::string>& stops,
                                        const monet::ExpertMask* mask) {
  if (s.max_tokens < 0) throw monet::Error("max_tokens must be >= 0, got " + std::to_string(s.max_tokens));
  for (const std::string& stop : stops)
    if (stop.empty()) throw monet::Error("stop: a stop string cannot be empty");
  if (!stops.empty()) m.tok();  // stop strings are text: they need the tokenizer
  monet::GenerateOptions go;
  go.stop_strings = stops;
  go.max_tokens = s.max_tokens;
  go.sampling.temperature = s.temperature;
  go.sampling.top_k = s.top_k;
  go.sampling.top_p = s.top_p;
  go.sampling.min_p = s.min_p;
  go.sampling.repeat_penalty = s.repeat_penalty;
  go.sampling.repeat_last_n = s.repeat_last_n;
  go.sampling.seed = s.seed;
  const auto& eos = m.model->config().eos_token_ids;
  go.stop_ids.assign(eos.begin(), eos.end());
  go.stop_ids.insert(go.stop_ids.end(), s.stop_ids.begin(), s.stop_ids.end());
  go.mask = mask;
  return go;
}

// (ids, text, finish_reason, prompt_tokens, prompt_seconds, generate_seconds)
using Generation = std::tuple<std::vector<int32_t>, std::string, std::string, int64_t, double, double>;

Generation to_tuple(const monet::GenerateResult& r) {
  return Generation(r.ids, r.text, r.finish_reason, r.stats.prompt_tokens, r.stats.prompt_seconds,
                    r.stats.generate_seconds);
}

// A cache ready for generation: with images, the prompt up to its last
// token prefilled (text and image embeddings); returns what generate() feeds
// next (the whole prompt without images) and sets prompt_size (positions).
std::vector<int32_t> start_generation(const Model& m, const std::vector<int32_t>& prompt,
                                      const std::vector<ImageInput>& images, int64_t max_tokens,
                                      const monet::ExpertMask* mask, monet::KvCache& cache, int64_t& prompt_size) {
  if (images.empty()) {
    prompt_size = int64_t(prompt.size());
    cache = m.model->new_cache(prompt_size + max_tokens);
    return prompt;
  }
  const monet::MultimodalPrompt mp = m.image_prompt(prompt, images);
  prompt_size = mp.size();
  cache = m.model->new_cache(prompt_size + max_tokens);
  return {monet::prefill_multimodal_prompt(*m.model, cache, mp, 0, mask)};
}

// monet::generate_text (stop strings, finish reason); with no tokenizer, ids only.
Generation generate(const Model& m, const std::vector<int32_t>& prompt, const Sampling& s,
                    const std::vector<std::string>& stops, const std::optional<std::string>& mask_json,
                    const std::string& mask_source,
                    const std::vector<std::tuple<std::string, std::optional<nb::bytes>>>& images) {
  const auto mask = m.mask_of(mask_json, mask_source);
  const monet::GenerateOptions go = generate_options(m, s, stops, mask ? &*mask : nullptr);
  const std::vector<ImageInput> inputs = image_inputs(images);
  return without_gil([&] {
    monet::KvCache cache;
    int64_t prompt_size = 0;
    const std::vector<int32_t> feed = start_generation(m, prompt, inputs, s.max_tokens, go.mask, cache, prompt_size);
    monet::GenerateResult r;
    if (m.tokenizer) {
      r = monet::generate_text(*m.model, *m.tokenizer, cache, feed, go, [](const std::string&) {
        check_signals();
        return true;
      });
    } else {
      r.ids = monet::generate(*m.model, cache, feed, go, [](int32_t) {
        check_signals();
        return true;
      }, &r.stats);
      const bool hit_length = int64_t(r.ids.size()) >= s.max_tokens || r.stats.hit_context_end;
      r.finish_reason = hit_length ? "length" : "stop";
    }
    r.stats.prompt_tokens = prompt_size;
    return to_tuple(r);
  });
}

// m.stream(): monet::generate_text on a worker thread; the consumer takes
// its text pieces (complete characters, nothing of a possible stop string
// early) from a queue. close() (the Python generator's end) stops the worker
// at its next piece and joins it.
class Stream {
 public:
  Stream(const Model& m, std::vector<int32_t> prompt, const Sampling& s, const std::vector<std::string>& stops,
         std::optional<monet::ExpertMask> mask, std::vector<ImageInput> images)
      : model_(m), prompt_(std::move(prompt)), sampling_(s), mask_(std::move(mask)), images_(std::move(images)) {
    model_.tok();  // a stream is text: fail now without a tokenizer
    go_ = generate_options(model_, sampling_, stops, mask_ ? &*mask_ : nullptr);
    worker_ = std::thread([this] { run(); });
  }
  ~Stream() { close(); }

  // The next piece of text, or None at the end; raises the worker's error.
  std::optional<std::string> next() {
    return without_gil([&]() -> std::optional<std::string> {
      std::unique_lock<std::mutex> lock(mu_);
      while (true) {
        if (!queue_.empty()) {
          std::string piece = std::move(queue_.front());
          queue_.pop_front();
          return piece;
        }
        if (done_) {
          if (!error_.empty()) throw monet::Error(error_);
          return std::nullopt;
        }
        // Wake up now and then to let Ctrl-C through.
        cv_.wait_for(lock, std::chrono::milliseconds(50));
        if (queue_.empty() && !done_) {
          lock.unlock();
          try {
            check_signals();
          } catch (const Interrupted&) {
            cancel_ = true;
            throw;
          }
          lock.lock();
        }
      }
    });
  }

  void close() {
    cancel_ = true;
    if (worker_.joinable()) {
      if (PyGILState_Check()) {
        nb::gil_scoped_release nogil;
        worker_.join();
      } else {
        worker_.join();
      }
    }
  }

  // After the end: (ids, finish_reason, prompt_tokens, prompt_seconds, generate_seconds)
  std::tuple<std::vector<int32_t>, std::string, int64_t, double, double> result() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done_) throw monet::Error("stream: the generation has not finished");
    return {ids_, reason_, stats_.prompt_tokens, stats_.prompt_seconds, stats_.generate_seconds};
  }

 private:
  void push(std::string piece) {
    if (piece.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(piece));
    cv_.notify_one();
  }

  void run() {
    monet::GenerateResult r;
    std::string error;
    try {
      monet::KvCache cache;
      int64_t prompt_size = 0;
      const std::vector<int32_t> feed =
          start_generation(model_, prompt_, images_, sampling_.max_tokens, go_.mask, cache, prompt_size);
      r = monet::generate_text(*model_.model, model_.tok(), cache, feed, go_, [&](const std::string& piece) {
        push(piece);
        return !cancel_;
      });
      r.stats.prompt_tokens = prompt_size;
    } catch (const std::exception& e) {
      error = e.what();
    }
    std::lock_guard<std::mutex> lock(mu_);
    ids_ = std::move(r.ids);
    stats_ = r.stats;
    reason_ = r.finish_reason;
    error_ = error;
    done_ = true;
    cv_.notify_one();
  }

  Model model_;  // shares the model and tokenizer: they outlive the worker
  std::vector<int32_t> prompt_;
  Sampling sampling_;
  std::optional<monet::ExpertMask> mask_;
  std::vector<ImageInput> images_;
  monet::GenerateOptions go_;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  std::atomic<bool> cancel_{false};
  bool done_ = false;
  std::vector<int32_t> ids_;
  monet::GenerateStats stats_;
  std::string reason_, error_;
};

// (mean loss, tokens): windows of `context` tokens, each starting with BOS,
// as `monet eval-loss`; a signal check between groups of windows.
std::tuple<double, int64_t> eval_loss(const Model& m, const std::string& text, int64_t context,
                                      const std::optional<std::string>& mask_json, const std::string& mask_source) {
  const auto mask = m.mask_of(mask_json, mask_source);
  return without_gil([&] {
    const monet::Tokenizer& tok = m.tok();
    const std::vector<int32_t> ids = tok.encode(text, false);
    if (ids.empty()) throw monet::Error("eval_loss: the text has no tokens");
    // Slices of whole windows: evaluate_loss over each gives the windows of
    // one run over all ids (a window holds `step` stream tokens after BOS).
    const size_t step = size_t(context) - (tok.bos_id() >= 0 ? 1 : 0);
    const size_t slice = step * size_t(std::max(1, m.model->threads()));  // the windows one batch runs side by side
    monet::LossResult total;
    for (size_t start = 0; start < ids.size(); start += slice) {
      check_signals();
      const std::vector<int32_t> part(ids.begin() + ptrdiff_t(start),
                                      ids.begin() + ptrdiff_t(std::min(ids.size(), start + slice)));
      const monet::LossResult r = monet::evaluate_loss(*m.model, part, context, tok.bos_id(), mask ? &*mask : nullptr);
      total.tokens += r.tokens;
      total.total_nll += r.total_nll;
    }
    return std::tuple<double, int64_t>(total.mean(), total.tokens);
  });
}

// The domain experts of the paper's statistic (monet find-experts): one mask
// (as mask-file JSON) per domain text.
std::vector<std::string> find_experts(const Model& m, const std::vector<std::string>& texts, int64_t context,
                                      double ratio, double min_prob) {
  if (texts.size() < 2) throw monet::Error("find_experts: give at least two domains");
  if (!(ratio >= 1.0)) throw monet::Error("find_experts: ratio must be >= 1, got " + std::to_string(ratio));
  if (!(min_prob >= 0.0)) throw monet::Error("find_experts: min_prob must be >= 0, got " + std::to_string(min_prob));
  return without_gil([&] {
    const monet::Tokenizer& tok = m.tok();
    context = std::min(context, m.model->config().max_position_embeddings);
    std::vector<monet::RoutingStats> stats;
    for (size_t d = 0; d < texts.size(); d++) {
      check_signals();
      const std::vector<int32_t> ids = tok.encode(texts[d], false);
      if (ids.empty()) throw monet::Error("find_experts: domain " + std::to_string(d) + " has no tokens");
      stats.push_back(monet::routing_stats(*m.model, ids, context, tok.bos_id()));
    }
    std::vector<std::string> masks;
    for (const monet::ExpertMask& mask : monet::domain_experts(m.model->config(), stats, ratio, min_prob))
      masks.push_back(mask.to_json());
    return masks;
  });
}

// The tokens expert `id` of router group g promotes most (the viewer's
// "outputs"): (id, token text, logit), strongest first.
std::vector<std::tuple<int32_t, std::string, float>> expert_outputs(const Model& m, int64_t group, int64_t id, int64_t n) {
  const monet::MonetConfig& c = m.model->config();
  if (group < 0 || group >= c.num_router_layers())
    throw monet::Error("group " + std::to_string(group) + " is outside [0, " + std::to_string(c.num_router_layers()) + ")");
  if (id < 0 || id >= c.moe_experts * c.moe_experts)
    throw monet::Error("expert " + std::to_string(id) + " is outside [0, " + std::to_string(c.moe_experts * c.moe_experts) + ")");
  if (n < 0) throw monet::Error("n must be >= 0, got " + std::to_string(n));
  return without_gil([&] {
    const std::vector<float> logits = monet::expert_output_logits(*m.model, group, id);
    std::vector<int32_t> order(logits.size());
    for (size_t k = 0; k < order.size(); k++) order[k] = int32_t(k);
    const size_t top = std::min(order.size(), size_t(n));
    std::partial_sort(order.begin(), order.begin() + ptrdiff_t(top), order.end(), [&](int32_t a, int32_t b) {
      return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
    });
    std::vector<std::tuple<int32_t, std::string, float>> out;
    for (size_t k = 0; k < top; k++)
      out.emplace_back(order[k], m.tokenizer ? m.tokenizer->token_text(order[k]) : std::to_string(order[k]),
                       logits[size_t(order[k])]);
    return out;
  });
}

// monet index: streams corpus files through the model into an expert index.
int64_t build_index(const Model& m, const std::vector<std::string>& files, const std::string& path, int64_t top_k,
                    int64_t window, int64_t context, float threshold, bool resume, int64_t checkpoint_tokens,
                    int64_t max_tokens) {
  monet::IndexOptions o;
  o.top_k = top_k;
  o.window = window;
  o.context = context;
  o.threshold = threshold;
  o.resume = resume;
  o.checkpoint_tokens = checkpoint_tokens;
  o.max_tokens = max_tokens;
  return without_gil([&] {
    // Ctrl-C between commits: what was committed stays (resume=True continues).
    const monet::IndexProgress p = monet::build_index(*m.model, m.tok(), files, path, o,
                                                      [](const monet::IndexProgress&) { check_signals(); });
    return p.tokens_done;
  });
}

// A conversation rendered with the checkpoint's chat template (or the named
// format: "llama2", "mistral", "chatml"): (prompt ids, the ids that end a reply).
std::tuple<std::vector<int32_t>, std::vector<int32_t>> chat_prompt(
    const Model& m, const std::vector<std::tuple<std::string, std::string>>& messages, const std::string& format_name,
    bool add_generation_prompt) {
  const monet::Tokenizer& tok = m.tok();
  if (format_name.empty() && tok.chat_template().empty())
    throw monet::Error(m.dir + ": tokenizer_config.json has no chat_template; name a chat_format "
                       "(\"llama2\", \"mistral\" or \"chatml\")");
  const monet::ChatFormat format = format_name.empty() ? monet::detect_chat_format(tok.chat_template())
                                                       : monet::chat_format_from_name(format_name);
  std::vector<monet::ChatMessage> msgs;
  for (const auto& [role, content] : messages) msgs.push_back({role, content});
  const std::string text = monet::render_chat_prompt(tok, format, msgs, add_generation_prompt);
  return {tok.encode(text, false), monet::chat_stop_ids(m.model->config(), tok, format)};
}

// monet.Index: read access to an expert index (the viewer's data). One
// SQLite connection, queried by one thread at a time.
class Index {
 public:
  explicit Index(const std::string& path) {
    without_gil([&] { reader_ = std::make_unique<monet::IndexReader>(path); });
  }

  nb::dict settings() const {
    const monet::IndexSettings& st = reader_->settings();
    nb::dict d;
    d["model"] = st.model;
    d["experts"] = st.experts;
    d["groups"] = st.groups;
    d["moe_groups"] = st.moe_groups;
    d["top_k"] = st.top_k;
    d["window"] = st.window;
    d["context"] = st.context;
    d["threshold"] = st.threshold;
    return d;
  }

  int64_t tokens() const {
    return locked([&] { return reader_->tokens(); });
  }

  // (experts, total fired) of a group; order: "count", "max" or "id".
  std::tuple<nb::list, int64_t> experts(int64_t group, const std::string& order, int64_t limit, int64_t offset) const {
    if (order != "count" && order != "max" && order != "id")
      throw monet::Error("order must be \"count\", \"max\" or \"id\", got \"" + order + "\"");
    if (limit < 0 || offset < 0) throw monet::Error("limit and offset must be >= 0");
    const monet::ExpertOrder by = order == "max" ? monet::ExpertOrder::MaxProb
                                  : order == "id" ? monet::ExpertOrder::Id : monet::ExpertOrder::Count;
    int64_t total = 0;
    const auto rows = locked([&] { return reader_->experts(group, by, limit, offset, &total); });
    nb::list out;
    for (const monet::ExpertSummary& e : rows) out.append(summary(e));
    return {out, total};
  }

  nb::dict expert(int64_t group, int64_t id) const {
    const monet::ExpertDetail e = locked([&] { return reader_->expert(group, id); });
    nb::dict d = summary(e.summary);
    d["group"] = group;
    d["i"] = id / reader_->settings().experts;
    d["j"] = id % reader_->settings().experts;
    nb::list contexts;
    for (const monet::ExpertContext& x : e.contexts) {
      nb::dict c;
      c["prob"] = x.prob;
      c["doc"] = x.doc;
      c["pos"] = x.pos;
      c["token"] = x.token;
      c["context"] = nb::cast(x.context);
      c["focus"] = x.focus;
      contexts.append(c);
    }
    d["contexts"] = contexts;
    return d;
  }

  nb::list search(const std::string& token, int64_t limit) const {
    if (token.empty()) throw monet::Error("search: the token is empty");
    if (limit < 0) throw monet::Error("limit must be >= 0, got " + std::to_string(limit));
    const auto rows = locked([&] { return reader_->search(token, limit); });
    nb::list out;
    for (const monet::TokenMatch& t : rows) {
      nb::dict d;
      d["group"] = t.group;
      d["expert"] = t.expert;
      d["contexts"] = t.contexts;
      d["max_prob"] = t.max_prob;
      out.append(d);
    }
    return out;
  }

 private:
  static nb::dict summary(const monet::ExpertSummary& e) {
    nb::dict d;
    d["expert"] = e.expert;
    d["count"] = e.count;
    d["density"] = e.density;
    d["max_prob"] = e.max_prob;
    return d;
  }

  template <class F>
  auto locked(F&& f) const -> decltype(f()) {
    return without_gil([&] {
      std::lock_guard<std::mutex> lock(mu_);
      return f();
    });
  }

  std::unique_ptr<monet::IndexReader> reader_;
  mutable std::mutex mu_;
};

}  // namespace

NB_MODULE(_monet, mod) {
  mod.doc() = "monet.cpp's library (use the `monet` package, not this module)";
  nb::exception<monet::Error>(mod, "Error", PyExc_ValueError);

  nb::class_<Sampling>(mod, "Sampling")
      .def(nb::init<>())
      .def_rw("temperature", &Sampling::temperature)
      .def_rw("top_k", &Sampling::top_k)
      .def_rw("top_p", &Sampling::top_p)
      .def_rw("min_p", &Sampling::min_p)
      .def_rw("repeat_penalty", &Sampling::repeat_penalty)
      .def_rw("repeat_last_n", &Sampling::repeat_last_n)
      .def_rw("seed", &Sampling::seed)
      .def_rw("max_tokens", &Sampling::max_tokens)
      .def_rw("stop_ids", &Sampling::stop_ids);

  nb::class_<Model>(mod, "Model")
      .def_static("load", &load_model, "dir"_a, "threads"_a, "compute"_a, "vision_tower"_a, "projector"_a,
                  "huge_pages"_a)
      .def_prop_ro("backend", [](const Model& m) { return m.model->backend_name(); })
      .def_prop_ro("dir", [](const Model& m) { return m.dir; })
      .def_prop_ro("threads", [](const Model& m) { return m.model->threads(); })
      .def_prop_ro("vocab_size", [](const Model& m) { return m.model->config().vocab_size; })
      .def_prop_ro("max_position_embeddings", [](const Model& m) { return m.model->config().max_position_embeddings; })
      .def_prop_ro("router_layers", [](const Model& m) {
        std::vector<int64_t> layers;
        for (int64_t r = 0; r < m.model->config().num_router_layers(); r++) layers.push_back(r * m.model->config().moe_groups);
        return layers;
      })
      .def_prop_ro("parameter_count", [](const Model& m) { return m.model->parameter_count(); })
      .def_prop_ro("has_tokenizer", [](const Model& m) { return bool(m.tokenizer); })
      .def_prop_ro("bos_id", [](const Model& m) { return m.tok().bos_id(); })
      .def("tokenize", [](const Model& m, const std::string& text, bool add_special) {
        return without_gil([&] { return m.tok().encode(text, add_special); });
      }, "text"_a, "add_special"_a)
      .def("detokenize", [](const Model& m, const std::vector<int32_t>& ids, bool skip_special) {
        return without_gil([&] { return m.tok().decode(ids, skip_special); });
      }, "ids"_a, "skip_special"_a)
      .def("token_text", [](const Model& m, int32_t id) { return m.tok().token_text(id); }, "id"_a)
      .def("forward", &forward, "ids"_a, "logits"_a, "routing"_a, "capture"_a, "mask_json"_a.none(), "mask_source"_a,
           "images"_a)
      .def("experts", &experts, "ids"_a, "threshold"_a, "mask_json"_a.none(), "mask_source"_a, "images"_a)
      .def("generate", &generate, "prompt"_a, "sampling"_a, "stop"_a, "mask_json"_a.none(), "mask_source"_a,
           "images"_a)
      .def("stream", [](const Model& m, std::vector<int32_t> prompt, const Sampling& s,
                        const std::vector<std::string>& stops, const std::optional<std::string>& mask_json,
                        const std::string& mask_source,
                        const std::vector<std::tuple<std::string, std::optional<nb::bytes>>>& images) {
        return new Stream(m, std::move(prompt), s, stops, m.mask_of(mask_json, mask_source), image_inputs(images));
      }, "prompt"_a, "sampling"_a, "stop"_a, "mask_json"_a.none(), "mask_source"_a, "images"_a)
      .def("tokenize_with_images", [](const Model& m, const std::string& text) {
        return without_gil([&] { return monet::tokenize_with_images(m.tok(), text); });
      }, "text"_a)
      .def("vision", [](const Model& m) {
        return without_gil([&] { return m.tower().describe(); });
      })
      .def("eval_loss", &eval_loss, "text"_a, "context"_a, "mask_json"_a.none(), "mask_source"_a)
      .def("chat_prompt", &chat_prompt, "messages"_a, "format"_a, "add_generation_prompt"_a)
      .def("find_experts", &find_experts, "texts"_a, "context"_a, "ratio"_a, "min_prob"_a)
      .def("expert_outputs", &expert_outputs, "group"_a, "expert"_a, "n"_a);

  nb::class_<Index>(mod, "Index")
      .def(nb::init<const std::string&>(), "path"_a)
      .def_prop_ro("settings", &Index::settings)
      .def_prop_ro("tokens", &Index::tokens)
      .def("experts", &Index::experts, "group"_a, "order"_a, "limit"_a, "offset"_a)
      .def("expert", &Index::expert, "group"_a, "expert"_a)
      .def("search", &Index::search, "token"_a, "limit"_a);

  mod.def("build_index", &build_index, "model"_a, "files"_a, "path"_a, "top_k"_a, "window"_a, "context"_a,
          "threshold"_a, "resume"_a, "checkpoint_tokens"_a, "max_tokens"_a);

  nb::class_<Stream>(mod, "Stream")
      .def("next", &Stream::next)
      .def("close", &Stream::close)
      .def("result", &Stream::result);

  mod.def("last_forward_seconds", [] { return last_forward_seconds; },
          "seconds of this thread's last forward pass inside the library (bench/bench_python.py)");

  mod.def("sentencepiece_to_tokenizer_json", [](const std::string& path) {
    return without_gil([&] { return monet::sentencepiece_to_tokenizer_json(path); });
  }, "model_path"_a);
}
