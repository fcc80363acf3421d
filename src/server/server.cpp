// The expert viewer: a JSON API over the index and the model, and one HTML
// page (src/server/viewer.html, embedded at build time).
#include "monet/server.h"

#include "server_state.h"

#include <httplib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <ctime>
#include <filesystem>
#include <thread>

#include "monet/error.h"
#include "monet/interp.h"
#include "monet/mask.h"
#include "monet/vision.h"

extern const char* const kMonetViewerHtml;

namespace monet {

namespace {

using json = nlohmann::json;

// An integer query parameter: absent -> fallback; present -> exactly an integer in [lo, hi].
int64_t int_param(const httplib::Request& req, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  if (!req.has_param(name)) return fallback;
  const std::string v = req.get_param_value(name);
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < lo || x > hi)
    fail("parameter ", name, "=", v, " must be an integer in [", lo, ", ", hi, "]");
  return x;
}

int64_t required_int_param(const httplib::Request& req, const char* name, int64_t lo, int64_t hi) {
  if (!req.has_param(name)) fail("parameter ", name, " is required (an integer in [", lo, ", ", hi, "])");
  return int_param(req, name, 0, lo, hi);
}

// Fields of a JSON request body: exactly the type asked for, in range.
int64_t json_int(const json& body, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  if (!body.contains(key) || body[key].is_null()) return fallback;
  const json& v = body[key];
  if (!v.is_number_integer()) fail("\"", key, "\" must be an integer in [", lo, ", ", hi, "], got ", v.dump());
  if (v.is_number_unsigned() ? (v.get<uint64_t>() > uint64_t(hi) || (lo > 0 && v.get<uint64_t>() < uint64_t(lo))) : (v.get<int64_t>() < lo || v.get<int64_t>() > hi))
    fail("\"", key, "\" = ", v.dump(), " is outside [", lo, ", ", hi, "]");
  return v.get<int64_t>();
}

double json_number(const json& body, const char* key, double fallback, double lo, double hi) {
  if (!body.contains(key) || body[key].is_null()) return fallback;
  const json& v = body[key];
  if (!v.is_number()) fail("\"", key, "\" must be a number in [", lo, ", ", hi, "], got ", v.dump());
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) fail("\"", key, "\" = ", v.dump(), " is outside [", lo, ", ", hi, "]");
  return x;
}

// Indices of the n largest scores, largest first.
std::vector<int32_t> top_ids(const std::vector<float>& scores, size_t n) {
  std::vector<int32_t> order(scores.size());
  for (size_t k = 0; k < order.size(); k++) order[k] = int32_t(k);
  n = std::min(n, order.size());
  std::partial_sort(order.begin(), order.begin() + ptrdiff_t(n), order.end(),
                    [&](int32_t a, int32_t b) { return scores[size_t(a)] > scores[size_t(b)]; });
  order.resize(n);
  return order;
}

json top_output_tokens(const Model& model, const Tokenizer& tok, int64_t group, int64_t id, int n) {
  const std::vector<float> logits = expert_output_logits(model, group, id);
  json out = json::array();
  for (int32_t k : top_ids(logits, size_t(n)))
    out.push_back({{"id", k}, {"token", tok.token_text(k)}, {"logit", logits[size_t(k)]}});
  return out;
}

// RGB bytes for the page (it draws them with putImageData).
std::string base64_encode(const std::vector<uint8_t>& bytes) {
  static const char* const digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t k = 0; k < bytes.size(); k += 3) {
    const size_t n = std::min<size_t>(3, bytes.size() - k);
    uint32_t acc = uint32_t(bytes[k]) << 16;
    if (n > 1) acc |= uint32_t(bytes[k + 1]) << 8;
    if (n > 2) acc |= uint32_t(bytes[k + 2]);
    for (size_t d = 0; d < 4; d++) out += d <= n ? digits[(acc >> (18 - 6 * d)) & 63] : '=';
  }
  return out;
}

json summary_json(const ExpertSummary& e) {
  return {{"expert", e.expert}, {"count", e.count}, {"density", e.density}, {"max_prob", e.max_prob}};
}

}  // namespace

void add_viewer_routes(Server::State& st) {
  auto get = [&st](const char* path, httplib::Server::Handler h) { st.routes.push_back({"GET", path, std::move(h)}); };
  auto post = [&st](const char* path, httplib::Server::Handler h) { st.routes.push_back({"POST", path, std::move(h)}); };
  // The viewer's routes answer 503 until the model is loaded.
  auto handle = [&st](auto fn) {
    return [&st, fn](const httplib::Request& req, httplib::Response& res) {
      if (!st.ready) {
        res.status = 503;
        res.set_content(json({{"error", "the model is loading"}}).dump(), "application/json");
        return;
      }
      try {
        res.set_content(fn(req, *st.served.model, *st.served.tok, st.served.index.get()), "application/json");
      } catch (const std::exception& e) {  // bad requests never take the server down
        res.status = 400;
        res.set_content(json({{"error", e.what()}}).dump(-1, ' ', false, json::error_handler_t::replace),
                        "application/json");
      }
    };
  };
  auto group_param = [](const httplib::Request& req, const MonetConfig& c) {
    return int_param(req, "group", 0, 0, c.num_router_layers() - 1);
  };
  const ServeOptions& opts = st.opts;

  get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kMonetViewerHtml, "text/html; charset=utf-8");
  });
  get("/api/info", handle([=, &st](const httplib::Request&, const Model& model, const Tokenizer&, const IndexReader* index) {
    const MonetConfig& c = model.config();
    json info = {{"model", model.dir()}, {"decompose", c.decompose_name()}, {"experts_per_side", c.moe_experts},
                 {"experts_per_group", c.moe_experts * c.moe_experts}, {"groups", c.num_router_layers()},
                 {"layers_per_group", c.moe_groups}, {"layers", c.num_hidden_layers}, {"has_index", index != nullptr}};
    info["vision"] = nullptr;  // VisionMonet: the probe takes an image
    if (st.served.vision) {
      const ClipVisionConfig& clip = st.served.vision->clip();
      info["vision"] = {{"image_size", clip.image_size}, {"patch_size", clip.patch_size}, {"grid", clip.grid()},
                        {"tokens_per_image", st.served.vision->tokens_per_image()}};
    }
    if (index) {
      const IndexSettings& settings = index->settings();
      info["tokens_indexed"] = index->tokens();
      info["index_settings"] = {{"model", settings.model}, {"experts", settings.experts}, {"groups", settings.groups},
                                {"moe_groups", settings.moe_groups}, {"top_k", settings.top_k},
                                {"window", settings.window}, {"context", settings.context},
                                {"threshold", settings.threshold}};
    }
    return info.dump();
  }));
  get("/api/experts", handle([=](const httplib::Request& req, const Model& model, const Tokenizer& tok, const IndexReader* index) {
    const MonetConfig& c = model.config();
    if (!index) fail("no index loaded: start monet serve with --index INDEX.db");
    const std::string order = req.has_param("order") ? req.get_param_value("order") : "count";
    if (order != "count" && order != "max" && order != "id") fail("parameter order must be count, max or id");
    const ExpertOrder by = order == "max" ? ExpertOrder::MaxProb : order == "id" ? ExpertOrder::Id : ExpertOrder::Count;
    const int64_t g = group_param(req, c);
    int64_t total = 0;
    json experts = json::array();
    for (const ExpertSummary& e : index->experts(g, by, int_param(req, "limit", 100, 1, 10000),
                                                 int_param(req, "offset", 0, 0, c.moe_experts * c.moe_experts), &total))
      experts.push_back(summary_json(e));
    return json({{"group", g}, {"total", total}, {"experts", experts}}).dump();
  }));
  get("/api/expert", handle([=](const httplib::Request& req, const Model& model, const Tokenizer& tok, const IndexReader* index) {
    const MonetConfig& c = model.config();
    const int64_t g = group_param(req, c);
    const int64_t id = required_int_param(req, "expert", 0, c.moe_experts * c.moe_experts - 1);
    json out = {{"group", g}, {"expert", id}};
    if (index) {
      const ExpertDetail e = index->expert(g, id);
      out = summary_json(e.summary);
      out["group"] = g;
      json contexts = json::array();
      for (const ExpertContext& x : e.contexts)
        contexts.push_back({{"prob", x.prob}, {"doc", x.doc}, {"pos", x.pos}, {"token", x.token},
                            {"context", x.context}, {"focus", x.focus}});
      out["contexts"] = contexts;
    }
    out["i"] = id / c.moe_experts;
    out["j"] = id % c.moe_experts;
    out["outputs"] = top_output_tokens(model, tok, g, id, 12);
    return out.dump();
  }));
  get("/api/search", handle([=](const httplib::Request& req, const Model& model, const Tokenizer& tok, const IndexReader* index) {
    if (!index) fail("no index loaded");
    if (!req.has_param("token") || req.get_param_value("token").empty()) fail("parameter token is required");
    const std::string token = req.get_param_value("token");
    json experts = json::array();
    for (const TokenMatch& m : index->search(token, int_param(req, "limit", 50, 1, 1000)))
      experts.push_back({{"group", m.group}, {"expert", m.expert}, {"contexts", m.contexts}, {"max_prob", m.max_prob}});
    return json({{"token", token}, {"experts", experts}}).dump();
  }));
  post("/api/probe", handle([=, &st](const httplib::Request& req, const Model& model, const Tokenizer& tok, const IndexReader* index) {
    const MonetConfig& c = model.config();
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::exception&) {
      fail("the body must be JSON {\"text\": \"...\"}");
    }
    if (!body.is_object() || !body.contains("text") || !body["text"].is_string()) fail("the body needs a string \"text\"");
    const float threshold = float(json_number(body, "threshold", 0.01, 0.0, 1.0));
    const int64_t top = json_int(body, "top", 8, 0, 1000), n_next = json_int(body, "next", 10, 0, 100);
    // An optional mask, as in a mask file: the probe runs the model with those experts removed.
    ExpertMask mask = ExpertMask::none(c);
    if (body.contains("mask") && !body["mask"].is_null()) mask = ExpertMask::parse_json(body["mask"].dump(), "the request's mask", c);
    const std::string text = body["text"].get<std::string>();
    // An optional image (VisionMonet), a data: URL as in the OpenAI API's image_url parts; the text
    // gets its <image> in front unless it places it, as `monet chat --image` does.
    const bool with_image = body.contains("image") && !body["image"].is_null();
    std::vector<int32_t> ids;
    MultimodalPrompt mp;  // with an image: per position, the patch it holds
    Image seen;           // the image as the tower sees it (padded, resized, cropped)
    if (with_image) {
      if (!body["image"].is_string()) fail("\"image\" must be a string: a data URL (data:image/png;base64,...)");
      Image image;
      try {
        image = decode_image_data_url(st, body["image"].get<std::string>(), "image", "the image");
      } catch (const std::exception& e) {
        fail("\"image\": ", e.what());
      }
      const VisionTower& vision = *st.served.vision;
      seen = clip_preprocess_rgb(image, vision.preprocess());
      const std::vector<std::vector<float>> embeds = {vision.embed_image(image)};
      mp = build_multimodal_prompt(model, tokenize_with_images(tok, with_image_placeholders(text, 1)), embeds,
                                   vision.tokens_per_image());
      ids = mp.ids;
    } else {
      ids = tok.encode(text, true);
    }
    if (ids.empty()) fail("the text has no tokens");
    if (int64_t(ids.size()) > std::min<int64_t>(c.max_position_embeddings, opts.max_probe_tokens))
      fail("the ", with_image ? "text and image have " : "text has ", ids.size(), " positions; the probe takes at most ",
           std::min<int64_t>(c.max_position_embeddings, opts.max_probe_tokens));
    RouterCapture cap;
    std::vector<float> logits;
    KvCache cache = model.new_cache(int64_t(ids.size()));
    if (with_image) {
      std::vector<Sequence> seqs(1);
      seqs[0].cache = &cache;
      seqs[0].embeds = mp.embeds.data();
      seqs[0].n = mp.size();
      seqs[0].logits = Logits::Last;
      seqs[0].logits_out = &logits;
      seqs[0].routing = &cap;
      seqs[0].mask = &mask;
      model.forward_batch(seqs);
    } else {
      ForwardOptions fo;
      fo.capture = &cap;
      fo.all_logits = false;
      fo.mask = &mask;
      model.forward(cache, ids.data(), int64_t(ids.size()), logits, fo);
    }
    auto experts_json = [](const std::vector<ExpertActivation>& list, size_t limit) {
      json ex = json::array();
      for (size_t k = 0; k < list.size() && k < limit; k++) ex.push_back({{"expert", list[k].id}, {"p", list[k].prob}});
      return ex;
    };
    // Per group: the experts above the threshold (at most `limit`), those the mask removed.
    auto groups_json = [&](size_t t, size_t limit) {
      json groups = json::array();
      for (size_t g = 0; g < cap.g1.size(); g++) {
        const TokenExperts te = token_experts(cap, t, g, c.moe_heads, c.moe_experts, threshold, &mask);
        groups.push_back({{"group", g}, {"count", te.kept.size()}, {"experts", experts_json(te.kept, limit)},
                          {"removed", experts_json(te.removed, limit)}});
      }
      return groups;
    };
    json tokens = json::array(), patches = json::array();
    for (size_t t = 0; t < ids.size(); t++) {
      if (ids[t] != kImageToken) {
        tokens.push_back({{"position", t}, {"id", ids[t]}, {"token", tok.token_text(ids[t])}, {"groups", groups_json(t, size_t(top))}});
        continue;
      }
      // An image patch: all its experts above the threshold (the heat map of any of them), and
      // where it lies in the grid (row, column from the top left; none for a CLS token).
      const VisionTower& vision = *st.served.vision;
      const int64_t grid = vision.clip().grid(), k = mp.patch[t] - (vision.llava().select_feature == "cls_patch" ? 1 : 0);
      json patch = {{"position", t}, {"patch", mp.patch[t]}, {"groups", groups_json(t, SIZE_MAX)}};
      if (k >= 0) {
        patch["row"] = k / grid;
        patch["col"] = k % grid;
      }
      patches.push_back(patch);
    }
    // The next-token distribution after the text (softmax of the last logits).
    const float mx = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (float l : logits) sum += std::exp(double(l - mx));
    json next = json::array();
    for (int32_t k : top_ids(logits, size_t(n_next)))
      next.push_back({{"id", k}, {"token", tok.token_text(k)}, {"p", std::exp(double(logits[size_t(k)] - mx)) / sum}});
    json out = {{"tokens", tokens}, {"next", next}, {"masked", mask.entry_count()}};
    if (with_image) {
      const ClipVisionConfig& clip = st.served.vision->clip();
      out["image"] = {{"width", seen.width}, {"height", seen.height}, {"rgb", base64_encode(seen.rgb)},
                      {"grid", clip.grid()}, {"patch_size", clip.patch_size}, {"patches", patches}};
    }
    return out.dump(-1, ' ', false, json::error_handler_t::replace);
  }));

}

Server::Server(ServeOptions opts) : state_(std::make_unique<State>()) {
  state_->opts = std::move(opts);
  state_->created_unix = int64_t(std::time(nullptr));
}

Server::~Server() = default;

namespace {

// Waits until httplib's listen loop runs (stop() before it would be lost).
void stop_http(httplib::Server& http, const std::atomic<bool>& listening) {
  while (!listening || !http.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  http.stop();
}

}  // namespace

void register_routes(Server::State& st) {
  st.http.set_pre_routing_handler([&st](const httplib::Request& req, httplib::Response& res) { return pre_route(st, req, res); });
  st.http.set_error_handler(httplib::Server::HandlerWithResponse(
      [&st](const httplib::Request& req, httplib::Response& res) { return on_error_response(st, req, res); }));
  for (const Route& r : st.routes) {
    if (r.method == "GET") st.http.Get(r.path, r.handler);
    else st.http.Post(r.path, r.handler);
  }
}

void dispatch(Server::State& st, const httplib::Request& req, httplib::Response& res) {
  if (pre_route(st, req, res) == httplib::Server::HandlerResponse::Unhandled) {
    bool routed = false;
    for (const Route& r : st.routes)
      if (r.method == req.method && r.path == req.path) {
        r.handler(req, res);
        routed = true;
        break;
      }
    if (res.status == -1) res.status = routed ? 200 : 404;
  } else if (res.status == -1) {
    res.status = 200;
  }
  if (res.status >= 400) on_error_response(st, req, res);
}

bool install_model(Server::State& st, ServedModel served) {
  const ServeOptions& o = st.opts;
  const MonetConfig& c = served.model->config();
  const int64_t context = o.context == 0 ? c.max_position_embeddings : o.context;
  if (context < 2 || context > c.max_position_embeddings)
    fail("serve: --ctx ", o.context, " must be in [2, max_position_embeddings = ", c.max_position_embeddings, "]");
  std::optional<ChatFormat> format;
  std::string format_error;
  try {
    if (!o.chat_template.empty()) format = chat_format_from_name(o.chat_template);
    else if (!served.tok->chat_template().empty()) format = detect_chat_format(served.tok->chat_template());
    else format_error = "the checkpoint has no chat template (tokenizer_config.json chat_template); start the "
                        "server with --template llama2|mistral|chatml";
  } catch (const Error& e) {
    if (!o.chat_template.empty()) throw;
    format_error = e.what();
  }
  std::string name = o.model_name;
  if (name.empty()) {
    name = std::filesystem::path(served.model->dir()).lexically_normal().filename().string();
    if (name.empty()) name = std::filesystem::path(served.model->dir()).lexically_normal().parent_path().filename().string();
    if (name.empty()) name = "monet";
  }
  std::lock_guard<std::mutex> lock(st.lifecycle);
  if (st.stopping) return false;
  st.context = context;
  st.chat_format = format;
  st.chat_format_error = format_error;
  st.model_name = name;
  st.served = std::move(served);
  st.scheduler = std::make_unique<BatchScheduler>(*st.served.model, *st.served.tok, o.parallel, context, o.max_queue);
  st.ready = true;
  return true;
}

void Server::run(const std::function<ServedModel()>& load) {
  State& st = *state_;
  const ServeOptions& o = st.opts;
  if (o.parallel < 1 || o.parallel > 1024) fail("serve: --parallel must be in [1, 1024], got ", o.parallel);
  if (o.http_threads < 1) fail("serve: http_threads must be >= 1, got ", o.http_threads);
  if (o.context < 0) fail("serve: --ctx must be >= 0, got ", o.context);
  st.http.new_task_queue = [n = o.http_threads] { return new httplib::ThreadPool(size_t(n)); };
  st.http.set_payload_max_length(o.max_body_bytes);
  // Clients keep their connections for many requests (httplib's default is 5 per connection).
  st.http.set_keep_alive_max_count(1000);
  add_openai_routes(st);
  add_viewer_routes(st);
  register_routes(st);
  int port = o.port;
  if (port == 0) port = st.http.bind_to_any_port(o.host);
  else if (!st.http.bind_to_port(o.host, port)) port = -1;
  if (port <= 0) fail("cannot listen on ", o.host, ":", o.port);
  if (o.on_ready) o.on_ready(o.host, port);

  std::atomic<bool> listening{false};
  std::thread loader([&] {
    try {
      ServedModel served = load();
      if (!served.model || !served.tok) fail("serve: the loader returned no model or no tokenizer");
      if (!install_model(st, std::move(served))) return;
    } catch (...) {
      st.load_error = std::current_exception();
      stop_http(st.http, listening);
      return;
    }
    if (o.on_loaded) o.on_loaded();
  });
  listening = true;
  st.http.listen_after_bind();
  loader.join();
  if (st.load_error) std::rethrow_exception(st.load_error);
}

void Server::shutdown() {
  State& st = *state_;
  BatchScheduler* scheduler = nullptr;
  {
    std::lock_guard<std::mutex> lock(st.lifecycle);
    st.stopping = true;
    scheduler = st.scheduler.get();
  }
  if (scheduler) scheduler->drain();  // every accepted request runs to its end
  // Their responses are being written: wait for them (bounded: a client that stopped reading times out).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (st.in_flight > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  while (!st.http.is_running() && !st.load_error) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  st.http.stop();
}

}  // namespace monet
