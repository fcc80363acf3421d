// The expert viewer: a JSON API over the index and the model, and one HTML
// page (src/server/viewer.html, embedded at build time).
#include "monet/server.h"

#include <httplib.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>

#include "backend/cpu/ops.h"
#include "monet/error.h"
#include "monet/interp.h"
#include "monet/mask.h"

extern const char* const kMonetViewerHtml;

namespace monet {

namespace {

using json = nlohmann::json;

int64_t int_param(const httplib::Request& req, const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  if (!req.has_param(name)) return fallback;
  const std::string v = req.get_param_value(name);
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo || x > hi)
    fail("parameter ", name, "=", v, " must be an integer in [", lo, ", ", hi, "]");
  return x;
}

// Sum of an expert's output columns in every layer of its group: the
// direction it writes into the residual stream (its inputs are relu^2 >= 0).
std::vector<float> expert_direction(const Model& model, int64_t group, int64_t i, int64_t j) {
  const MonetConfig& c = model.config();
  const int64_t d = c.hidden_size;
  std::vector<float> dir(size_t(d), 0.0f), row;
  auto add_rows = [&](const Weight& w, int64_t row0, int64_t n, float* out) {
    row.resize(size_t(w.cols));
    for (int64_t r = 0; r < n; r++) {
      cpu::widen(w, (row0 + r) * w.cols, w.cols, row.data());
      for (int64_t k = 0; k < w.cols; k++) out[k] += row[size_t(k)];
    }
  };
  for (int64_t l = group * c.moe_groups; l < std::min(c.num_hidden_layers, (group + 1) * c.moe_groups); l++) {
    const LayerWeights& lw = model.weights().layers[size_t(l)];
    if (c.moe_decompose == Decompose::Vertical) {
      const int64_t w = c.moe_dim / 2;
      add_rows(lw.v11, i * w, w, dir.data());
      add_rows(lw.v12, i * w, w, dir.data());
      add_rows(lw.v21, j * w, w, dir.data() + d / 2);
      add_rows(lw.v22, j * w, w, dir.data() + d / 2);
    } else {
      add_rows(lw.v, j * c.moe_dim, c.moe_dim, dir.data());
    }
  }
  return dir;
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
  const MonetConfig& c = model.config();
  std::vector<float> dir = expert_direction(model, group, id / c.moe_experts, id % c.moe_experts);
  for (int64_t k = 0; k < c.hidden_size; k++) dir[size_t(k)] *= model.weights().final_norm[size_t(k)];
  std::vector<float> logits(size_t(c.vocab_size));
  cpu::linear(model.weights().lm_head, dir.data(), 1, logits.data());
  json out = json::array();
  for (int32_t k : top_ids(logits, size_t(n)))
    out.push_back({{"id", k}, {"token", tok.token_text(k)}, {"logit", logits[size_t(k)]}});
  return out;
}

}  // namespace

void serve(const Model& model, const Tokenizer& tok, const IndexReader* index, const ServeOptions& opts) {
  httplib::Server server;
  server.set_payload_max_length(1 << 20);  // probe texts are small; refuse huge bodies early
  std::mutex model_mutex;  // the forward pass uses the shared OpenMP pool: one at a time
  const MonetConfig& c = model.config();

  auto handle = [](auto fn) {
    return [fn](const httplib::Request& req, httplib::Response& res) {
      try {
        res.set_content(fn(req), "application/json");
      } catch (const std::exception& e) {  // bad requests never take the server down
        res.status = 400;
        res.set_content(json({{"error", e.what()}}).dump(), "application/json");
      }
    };
  };
  auto group_param = [&](const httplib::Request& req) {
    return int_param(req, "group", 0, 0, c.num_router_layers() - 1);
  };

  server.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kMonetViewerHtml, "text/html; charset=utf-8");
  });
  server.Get("/api/info", handle([&](const httplib::Request&) {
    json info = {{"model", model.dir()}, {"decompose", c.decompose_name()}, {"experts_per_side", c.moe_experts},
                 {"experts_per_group", c.moe_experts * c.moe_experts}, {"groups", c.num_router_layers()},
                 {"layers_per_group", c.moe_groups}, {"layers", c.num_hidden_layers}, {"has_index", index != nullptr}};
    if (index) {
      info["tokens_indexed"] = std::stoll(index->meta("tokens").empty() ? "0" : index->meta("tokens"));
      info["index_settings"] = json::parse(index->meta("settings"));
    }
    return info.dump();
  }));
  server.Get("/api/experts", handle([&](const httplib::Request& req) {
    if (!index) fail("no index loaded: start monet serve with --index INDEX.db");
    const std::string order = req.has_param("order") ? req.get_param_value("order") : "count";
    if (order != "count" && order != "max" && order != "id") fail("parameter order must be count, max or id");
    return index->experts_json(group_param(req), order, int_param(req, "limit", 100, 1, 10000),
                               int_param(req, "offset", 0, 0, c.moe_experts * c.moe_experts));
  }));
  server.Get("/api/expert", handle([&](const httplib::Request& req) {
    const int64_t g = group_param(req);
    const int64_t id = int_param(req, "expert", -1, 0, c.moe_experts * c.moe_experts - 1);
    json out = index ? json::parse(index->expert_json(g, id)) : json({{"group", g}, {"expert", id}});
    out["i"] = id / c.moe_experts;
    out["j"] = id % c.moe_experts;
    std::lock_guard<std::mutex> lock(model_mutex);
    out["outputs"] = top_output_tokens(model, tok, g, id, 12);
    return out.dump();
  }));
  server.Get("/api/search", handle([&](const httplib::Request& req) {
    if (!index) fail("no index loaded");
    if (!req.has_param("token") || req.get_param_value("token").empty()) fail("parameter token is required");
    return index->search_json(req.get_param_value("token"), int_param(req, "limit", 50, 1, 1000));
  }));
  server.Post("/api/probe", handle([&](const httplib::Request& req) {
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::exception&) {
      fail("the body must be JSON {\"text\": \"...\"}");
    }
    if (!body.is_object() || !body.contains("text") || !body["text"].is_string()) fail("the body needs a string \"text\"");
    const float threshold = body.value("threshold", 0.01f);
    const int top = body.value("top", 8), n_next = body.value("next", 10);
    if (!(threshold >= 0) || top < 0 || n_next < 0 || n_next > 100)
      fail("threshold must be >= 0, top >= 0 and next in [0, 100]");
    // An optional mask, as in a mask file: the probe runs the model with those experts removed.
    ExpertMask mask = ExpertMask::none(c);
    if (body.contains("mask") && !body["mask"].is_null()) mask = ExpertMask::parse_json(body["mask"].dump(), "the request's mask", c);
    std::vector<int32_t> ids = tok.encode(body["text"].get<std::string>(), true);
    if (ids.empty()) fail("the text has no tokens");
    if (int64_t(ids.size()) > std::min<int64_t>(c.max_position_embeddings, opts.max_probe_tokens))
      fail("the text has ", ids.size(), " tokens; the probe takes at most ",
           std::min<int64_t>(c.max_position_embeddings, opts.max_probe_tokens));
    RouterCapture cap;
    ForwardOptions fo;
    fo.capture = &cap;
    fo.all_logits = false;
    fo.mask = &mask;
    std::vector<float> logits;
    {
      std::lock_guard<std::mutex> lock(model_mutex);
      KvCache cache = model.new_cache(int64_t(ids.size()));
      model.forward(cache, ids.data(), int64_t(ids.size()), logits, fo);
    }
    auto experts_json = [top](const std::vector<ExpertActivation>& list) {
      json ex = json::array();
      for (size_t k = 0; k < list.size() && int(k) < top; k++) ex.push_back({{"expert", list[k].id}, {"p", list[k].prob}});
      return ex;
    };
    json tokens = json::array();
    for (size_t t = 0; t < ids.size(); t++) {
      json groups = json::array();
      for (size_t g = 0; g < cap.g1.size(); g++) {
        const TokenExperts te = token_experts(cap, t, g, c.moe_heads, c.moe_experts, threshold, &mask);
        groups.push_back({{"group", g}, {"count", te.kept.size()}, {"experts", experts_json(te.kept)},
                          {"removed", experts_json(te.removed)}});
      }
      tokens.push_back({{"id", ids[t]}, {"token", tok.token_text(ids[t])}, {"groups", groups}});
    }
    // The next-token distribution after the text (softmax of the last logits).
    const float mx = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (float l : logits) sum += std::exp(double(l - mx));
    json next = json::array();
    for (int32_t k : top_ids(logits, size_t(n_next)))
      next.push_back({{"id", k}, {"token", tok.token_text(k)}, {"p", std::exp(double(logits[size_t(k)] - mx)) / sum}});
    return json({{"tokens", tokens}, {"next", next}, {"masked", mask.removed_count()}}).dump();
  }));

  if (!server.bind_to_port(opts.host, opts.port)) fail("cannot listen on ", opts.host, ":", opts.port);
  if (opts.on_ready) opts.on_ready(opts.host, opts.port);
  server.listen_after_bind();
}

}  // namespace monet
