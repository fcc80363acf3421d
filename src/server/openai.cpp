// The OpenAI-compatible API of `monet serve`: /v1/completions,
// /v1/chat/completions (streaming as server-sent events), /v1/models,
// /tokenize, /detokenize, /health and /metrics. Requests become
// BatchRequests of the server's BatchScheduler (continuous batching);
// every field is validated and errors are OpenAI-shaped:
// {"error": {"message", "type", "param", "code"}}.
#include <httplib.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "monet/error.h"
#include "monet/interp.h"
#include "monet/image.h"
#include "monet/mask.h"
#include "monet/vision.h"
#include "server_state.h"

namespace monet {

namespace {

using json = nlohmann::json;

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// A request the API refuses: the HTTP status and OpenAI's error fields.
struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int status_, const std::string& message, std::string param_ = "", std::string code_ = "",
           std::string type_ = "")
      : std::runtime_error(message), status(status_), type(std::move(type_)), param(std::move(param_)),
        code(std::move(code_)) {}
};

[[noreturn]] void bad(const std::string& param, const std::string& message) { throw ApiError(400, message, param); }

json error_json(int status, const std::string& message, const std::string& type, const std::string& param,
                const std::string& code) {
  std::string t = type;
  if (t.empty()) t = status == 401 ? "authentication_error" : status >= 500 ? "server_error" : "invalid_request_error";
  return {{"error",
           {{"message", message}, {"type", t}, {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

void send_error(httplib::Response& res, int status, const std::string& message, const std::string& param = "",
                const std::string& code = "", const std::string& type = "") {
  res.status = status;
  res.set_content(dump(error_json(status, message, type, param, code)), "application/json");
}

// --- strict field readers -------------------------------------------------

const json* field(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

void only_fields(const json& body, const std::set<std::string>& known, const std::string& where) {
  for (auto it = body.begin(); it != body.end(); ++it)
    if (!known.count(it.key())) {
      std::string list;
      for (const std::string& k : known) list += (list.empty() ? "" : ", ") + k;
      bad(it.key(), "unknown field \"" + it.key() + "\" in " + where + " (accepted: " + list + ")");
    }
}

int64_t get_int(const json& body, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = field(body, key);
  if (!v) return fallback;
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!v->is_number_integer()) bad(key, std::string("\"") + key + "\" must be an integer in " + range + ", got " + dump(*v));
  const bool out = v->is_number_unsigned() ? (v->get<uint64_t>() > uint64_t(hi) || (lo > 0 && v->get<uint64_t>() < uint64_t(lo)))
                                           : (v->get<int64_t>() < lo || v->get<int64_t>() > hi);
  if (out) bad(key, std::string("\"") + key + "\" = " + dump(*v) + " is outside " + range);
  return v->get<int64_t>();
}

double get_number(const json& body, const char* key, double fallback, double lo, double hi, bool lo_open = false) {
  const json* v = field(body, key);
  if (!v) return fallback;
  const std::string range = std::string(lo_open ? "(" : "[") + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (!v->is_number()) bad(key, std::string("\"") + key + "\" must be a number in " + range + ", got " + dump(*v));
  const double x = v->get<double>();
  if (!(lo_open ? x > lo : x >= lo) || !(x <= hi)) bad(key, std::string("\"") + key + "\" = " + dump(*v) + " is outside " + range);
  return x;
}

bool get_bool(const json& body, const char* key, bool fallback) {
  const json* v = field(body, key);
  if (!v) return fallback;
  if (!v->is_boolean()) bad(key, std::string("\"") + key + "\" must be true or false, got " + dump(*v));
  return v->get<bool>();
}

// --- what one API request asks for ----------------------------------------

struct PromptIn {
  std::vector<int32_t> ids;
  std::string echo_text;  // the prompt as text (completions' echo)
  std::shared_ptr<const std::vector<float>> embeds;  // with images: every position's input embedding
};

struct GenSpec {
  bool chat = false;
  std::vector<PromptIn> prompts;
  int n = 1;
  int64_t max_tokens = -1;  // -1: not given
  SamplingParams sampling;
  bool seed_given = false;
  std::vector<std::string> stops;
  std::vector<int32_t> stop_ids;
  int logprobs = -1;  // completions: the number of alternatives; chat: top_logprobs
  bool echo = false;
  bool stream = false, include_usage = false;
  std::shared_ptr<const ExpertMask> mask;
  bool return_experts = false;
  float experts_threshold = 0.01f;
  int64_t experts_top = 8;  // 0: all above the threshold
  bool return_token_ids = false;
};

const std::set<std::string> kCommonFields = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                                             "seed", "stop", "n", "logprobs", "stream", "stream_options", "user",
                                             "repetition_penalty", "expert_mask", "return_experts",
                                             "return_token_ids"};

std::vector<int32_t> parse_ids(const json& arr, const std::string& param, int64_t vocab) {
  std::vector<int32_t> ids;
  for (const json& x : arr) {
    if (!x.is_number_integer()) bad(param, "\"" + param + "\": token ids must be integers, got " + dump(x));
    const bool out = x.is_number_unsigned() ? x.get<uint64_t>() >= uint64_t(vocab)
                                            : (x.get<int64_t>() < 0 || x.get<int64_t>() >= vocab);
    if (out) bad(param, "\"" + param + "\": token id " + dump(x) + " is outside the vocabulary [0, " +
                            std::to_string(vocab) + ")");
    ids.push_back(x.get<int32_t>());
  }
  return ids;
}

void check_model(const Server::State& st, const json& body) {
  const json* m = field(body, "model");
  if (!m) bad("model", "\"model\" is required (GET /v1/models lists it: \"" + st.model_name + "\")");
  if (!m->is_string()) bad("model", "\"model\" must be a string, got " + dump(*m));
  const std::string name = m->get<std::string>();
  if (name != st.model_name && name != st.served.model->dir())
    throw ApiError(404, "the model \"" + name + "\" does not exist; this server serves \"" + st.model_name + "\"",
                   "model", "model_not_found");
}

void parse_common(const Server::State& st, const json& body, GenSpec& g) {
  const MonetConfig& c = st.served.model->config();
  check_model(st, body);
  const int64_t limit = st.opts.max_tokens_limit > 0 ? st.opts.max_tokens_limit : st.context;
  g.max_tokens = get_int(body, "max_tokens", -1, 0, limit);
  g.n = int(get_int(body, "n", 1, 1, 16));
  g.sampling.temperature = float(get_number(body, "temperature", 1.0, 0.0, 2.0));
  g.sampling.top_p = float(get_number(body, "top_p", 1.0, 0.0, 1.0, true));
  const int64_t top_k = get_int(body, "top_k", 0, -1, c.vocab_size);
  g.sampling.top_k = int(std::max<int64_t>(top_k, 0));  // -1 (vLLM's "off") and 0: off
  g.sampling.min_p = float(get_number(body, "min_p", 0.0, 0.0, 0.999999));
  g.sampling.repeat_penalty = float(get_number(body, "repetition_penalty", 1.0, 0.0, 10.0, true));
  g.sampling.repeat_last_n = -1;
  if (const json* s = field(body, "seed")) {
    if (!s->is_number_integer()) bad("seed", "\"seed\" must be an integer, got " + dump(*s));
    g.sampling.seed = s->is_number_unsigned() ? s->get<uint64_t>() : uint64_t(s->get<int64_t>());
    g.seed_given = true;
  }
  if (const json* s = field(body, "stop")) {
    std::vector<json> items;
    if (s->is_string()) items.push_back(*s);
    else if (s->is_array()) items.assign(s->begin(), s->end());
    else bad("stop", "\"stop\" must be a string or a list of strings, got " + dump(*s));
    if (items.size() > 16) bad("stop", "\"stop\" takes at most 16 strings, got " + std::to_string(items.size()));
    for (const json& x : items) {
      if (!x.is_string() || x.get<std::string>().empty())
        bad("stop", "\"stop\" strings must be non-empty strings, got " + dump(x));
      if (x.get<std::string>().size() > 1000) bad("stop", "a \"stop\" string is longer than 1000 bytes");
      g.stops.push_back(x.get<std::string>());
    }
  }
  g.stream = get_bool(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!g.stream) bad("stream_options", "\"stream_options\" is only allowed with \"stream\": true");
    if (!so->is_object()) bad("stream_options", "\"stream_options\" must be an object, got " + dump(*so));
    only_fields(*so, {"include_usage"}, "stream_options");
    g.include_usage = get_bool(*so, "include_usage", false);
  }
  if (const json* u = field(body, "user"); u && !u->is_string()) bad("user", "\"user\" must be a string");
  if (const json* m = field(body, "expert_mask")) {
    if (!m->is_object()) bad("expert_mask", "\"expert_mask\" must be a mask-file object {\"experts\": [...], \"components\": [...]}");
    try {
      g.mask = std::make_shared<const ExpertMask>(ExpertMask::parse_json(dump(*m), "expert_mask", c));
    } catch (const Error& e) {
      bad("expert_mask", e.what());
    }
  }
  if (const json* r = field(body, "return_experts")) {
    if (r->is_boolean()) {
      g.return_experts = r->get<bool>();
    } else if (r->is_object()) {
      only_fields(*r, {"threshold", "top"}, "return_experts");
      g.return_experts = true;
      g.experts_threshold = float(get_number(*r, "threshold", 0.01, 0.0, 1.0));
      g.experts_top = get_int(*r, "top", 8, 0, c.moe_experts * c.moe_experts);
    } else {
      bad("return_experts", "\"return_experts\" must be true/false or {\"threshold\": 0.01, \"top\": 8}, got " + dump(*r));
    }
  }
  g.return_token_ids = get_bool(body, "return_token_ids", false);
}

// The max_tokens of each prompt: checked against the context (400 when the
// prompt and the asked-for tokens do not fit), defaulted where not given.
int64_t max_tokens_for(const Server::State& st, const GenSpec& g, const PromptIn& p) {
  const int64_t prompt = int64_t(p.ids.size());
  const int64_t room = st.context - prompt;
  if (room < 1)
    bad(g.chat ? "messages" : "prompt", "this model's context holds " + std::to_string(st.context) +
                                            " tokens, but the prompt has " + std::to_string(prompt) +
                                            " (at least one token must be generated)");
  if (g.max_tokens < 0) return g.chat ? room : std::min<int64_t>(16, room);
  if (g.max_tokens > room)
    bad(g.chat ? "max_completion_tokens" : "max_tokens",
        "this model's context holds " + std::to_string(st.context) + " tokens; the prompt has " +
            std::to_string(prompt) + " and " + std::to_string(g.max_tokens) + " more were asked for");
  return g.max_tokens;
}

GenSpec parse_completion(const Server::State& st, const json& body) {
  std::set<std::string> known = kCommonFields;
  known.insert({"prompt", "echo"});
  only_fields(body, known, "the request");
  GenSpec g;
  parse_common(st, body, g);
  const Tokenizer& tok = *st.served.tok;
  const int64_t V = st.served.model->config().vocab_size;
  g.logprobs = int(get_int(body, "logprobs", -1, 0, 20));
  g.echo = get_bool(body, "echo", false);
  const json* p = field(body, "prompt");
  if (!p) bad("prompt", "\"prompt\" is required: a string, a list of token ids, or a list of either");
  auto text_prompt = [&](const std::string& s) { return PromptIn{tok.encode(s, true), s, nullptr}; };
  auto ids_prompt = [&](const json& arr) {
    PromptIn in;
    in.ids = parse_ids(arr, "prompt", V);
    in.echo_text = tok.decode(in.ids, false);
    return in;
  };
  if (p->is_string()) {
    g.prompts.push_back(text_prompt(p->get<std::string>()));
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    g.prompts.push_back(ids_prompt(*p));
  } else if (p->is_array() && !p->empty()) {
    for (const json& x : *p) {
      if (x.is_string()) g.prompts.push_back(text_prompt(x.get<std::string>()));
      else if (x.is_array() && !x.empty()) g.prompts.push_back(ids_prompt(x));
      else bad("prompt", "\"prompt\" list items must be strings or non-empty lists of token ids, got " + dump(x));
    }
  } else {
    bad("prompt", "\"prompt\" must be a string, a non-empty list of token ids, or a list of either, got " + dump(*p));
  }
  if (g.prompts.size() * size_t(g.n) > 64)
    bad("prompt", "at most 64 choices per request (prompts x n), got " + std::to_string(g.prompts.size() * size_t(g.n)));
  const MonetConfig& c = st.served.model->config();
  g.stop_ids.assign(c.eos_token_ids.begin(), c.eos_token_ids.end());  // as `monet generate`
  return g;
}

// The bytes of a base64 text (standard or URL-safe alphabet, padding optional).
std::vector<uint8_t> base64_decode(const std::string& text, const std::string& param) {
  std::vector<uint8_t> out;
  out.reserve(text.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t k = 0;
  for (; k < text.size() && text[k] != '='; k++) {
    const char ch = text[k];
    int v = -1;
    if (ch >= 'A' && ch <= 'Z') v = ch - 'A';
    else if (ch >= 'a' && ch <= 'z') v = ch - 'a' + 26;
    else if (ch >= '0' && ch <= '9') v = ch - '0' + 52;
    else if (ch == '+' || ch == '-') v = 62;
    else if (ch == '/' || ch == '_') v = 63;
    else if (ch == '\n' || ch == '\r') continue;
    else bad(param, "the data URL's base64 has an invalid character at offset " + std::to_string(k));
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(uint8_t((acc >> bits) & 0xff));
    }
  }
  for (; k < text.size(); k++)
    if (text[k] != '=') bad(param, "the data URL's base64 has data after its padding");
  return out;
}

// An image_url content part: a data: URL, decoded and embedded by the vision
// tower. Remote URLs are refused: the server never fetches anything.
std::vector<float> embed_image_part(const Server::State& st, const json& part, size_t index) {
  only_fields(part, {"type", "image_url"}, "an image_url content part");
  const json* iu = field(part, "image_url");
  std::string url;
  if (iu && iu->is_string()) {
    url = iu->get<std::string>();
  } else if (iu && iu->is_object()) {
    only_fields(*iu, {"url", "detail"}, "image_url");
    if (!iu->contains("url") || !(*iu)["url"].is_string()) bad("messages", "image_url needs a string \"url\"");
    url = (*iu)["url"].get<std::string>();
  } else {
    bad("messages", "an image_url part needs \"image_url\": {\"url\": \"data:image/...;base64,...\"}");
  }
  const Image image = decode_image_data_url(st, url, "messages", "image " + std::to_string(index));
  try {
    return st.served.vision->embed_image(image);
  } catch (const Error& e) {
    bad("messages", e.what());
  }
}

}  // namespace

// Shared with the viewer's probe (server_state.h).
Image decode_image_data_url(const Server::State& st, const std::string& url, const std::string& param,
                            const std::string& name) {
  if (url.rfind("data:", 0) != 0) {
    const bool remote = url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0;
    bad(param, std::string(remote ? "remote image URLs are not fetched (the server makes no network requests)"
                                  : "image URLs must be data: URLs") +
                   "; send the image inline as data:image/png;base64,...");
  }
  if (!st.served.vision)
    bad(param, "this checkpoint has no vision tower: images need a VisionMonet (llava_monet) checkpoint");
  const size_t comma = url.find(',');
  if (comma == std::string::npos) bad(param, "the data URL has no ',' before its data");
  const std::string meta = url.substr(5, comma - 5);
  if (meta.size() < 7 || meta.compare(meta.size() - 7, 7, ";base64") != 0)
    bad(param, "the data URL must be base64 (data:image/png;base64,...)");
  const std::vector<uint8_t> bytes = base64_decode(url.substr(comma + 1), param);
  try {
    return decode_image(bytes.data(), bytes.size(), name);
  } catch (const Error& e) {
    bad(param, e.what());
  }
}

namespace {

GenSpec parse_chat(const Server::State& st, const json& body) {
  std::set<std::string> known = kCommonFields;
  known.insert({"messages", "max_completion_tokens", "top_logprobs"});
  only_fields(body, known, "the request");
  GenSpec g;
  g.chat = true;
  parse_common(st, body, g);
  const int64_t limit = st.opts.max_tokens_limit > 0 ? st.opts.max_tokens_limit : st.context;
  const int64_t mct = get_int(body, "max_completion_tokens", -1, 0, limit);
  if (mct >= 0) g.max_tokens = mct;
  const bool logprobs = get_bool(body, "logprobs", false);
  const int64_t top = get_int(body, "top_logprobs", -1, 0, 20);
  if (top >= 0 && !logprobs) bad("top_logprobs", "\"top_logprobs\" needs \"logprobs\": true");
  g.logprobs = logprobs ? int(std::max<int64_t>(top, 0)) : -1;
  if (!st.chat_format) throw ApiError(400, st.chat_format_error, "messages", "no_chat_template");
  const json* m = field(body, "messages");
  if (!m || !m->is_array() || m->empty()) bad("messages", "\"messages\" must be a non-empty list of {\"role\", \"content\"}");
  std::vector<ChatMessage> msgs;
  std::vector<std::vector<float>> images;  // in the order of their parts
  for (const json& x : *m) {
    if (!x.is_object()) bad("messages", "each message must be an object {\"role\", \"content\"}, got " + dump(x));
    only_fields(x, {"role", "content", "name"}, "a message");
    const json* role = field(x, "role");
    if (!role || !role->is_string()) bad("messages", "each message needs a string \"role\"");
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";
    if (r != "system" && r != "user" && r != "assistant")
      bad("messages", "message role must be system, developer, user or assistant, got \"" + r + "\"");
    const json* content = field(x, "content");
    if (!content) bad("messages", "each message needs \"content\"");
    std::string text;
    if (content->is_string()) {
      text = content->get<std::string>();
    } else if (content->is_array()) {
      for (const json& part : *content) {
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
          bad("messages", "content parts must be objects with a \"type\", got " + dump(part));
        const std::string type = part["type"].get<std::string>();
        if (!text.empty()) text += "\n";
        if (type == "image_url") {
          // LLaVA's placeholder where the image goes; its patches replace it.
          images.push_back(embed_image_part(st, part, images.size()));
          text += kImagePlaceholder;
          continue;
        }
        if (type != "text") bad("messages", "content part type \"" + type + "\" is not supported (text, image_url)");
        only_fields(part, {"type", "text"}, "a content part");
        if (!part.contains("text") || !part["text"].is_string()) bad("messages", "a text part needs a string \"text\"");
        text += part["text"].get<std::string>();
      }
    } else {
      bad("messages", "message content must be a string or a list of parts, got " + dump(*content));
    }
    msgs.push_back({r, text});
  }
  const Tokenizer& tok = *st.served.tok;
  std::string rendered;
  try {
    rendered = render_chat_prompt(tok, *st.chat_format, msgs, true);
  } catch (const Error& e) {
    bad("messages", e.what());
  }
  if (images.empty()) {
    g.prompts.push_back({tok.encode(rendered, false), rendered, nullptr});
  } else {
    MultimodalPrompt mp;
    try {
      mp = build_multimodal_prompt(*st.served.model, tokenize_with_images(tok, rendered, false), images,
                                   st.served.vision->tokens_per_image());
    } catch (const Error& e) {
      bad("messages", e.what());
    }
    g.prompts.push_back({mp.ids, rendered, std::make_shared<const std::vector<float>>(std::move(mp.embeds))});
  }
  g.stop_ids = chat_stop_ids(st.served.model->config(), tok, *st.chat_format);
  return g;
}

// --- one running API request ----------------------------------------------

struct Choice {
  size_t prompt = 0;
  uint64_t id = 0;
  std::deque<TokenEvent> events;
  bool done = false, reported = false;
  BatchResult result;
  // What has been sent or collected so far.
  std::string text;
  std::vector<int32_t> ids;
  json logprob_items = json::array();  // chat: logprobs.content; completions: one entry per token
  json experts = json::array();
  bool started = false;  // streaming: the first chunk (role / echo) went out
};

struct Job {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Choice> choices;
  std::atomic<bool> cancelled{false};
};

json bytes_json(const Tokenizer& tok, int32_t id) {
  json b = json::array();
  for (unsigned char ch : tok.token_bytes(id)) b.push_back(int(ch));
  return b;
}

json chat_logprob(const Tokenizer& tok, const TokenLogprob& lp) {
  json top = json::array();
  for (const auto& [id, l] : lp.top)
    top.push_back({{"token", tok.token_text(id)}, {"logprob", l}, {"bytes", bytes_json(tok, id)}});
  return {{"token", tok.token_text(lp.id)}, {"logprob", lp.logprob}, {"bytes", bytes_json(tok, lp.id)},
          {"top_logprobs", top}};
}

json experts_json(const Server::State& st, const GenSpec& g, const TokenEvent& ev) {
  const MonetConfig& c = st.served.model->config();
  RouterCapture cap;
  cap.g1 = ev.g1;
  cap.g2 = ev.g2;
  json groups = json::array();
  auto list = [&](const std::vector<ExpertActivation>& acts) {
    json out = json::array();
    for (size_t k = 0; k < acts.size() && (g.experts_top == 0 || int64_t(k) < g.experts_top); k++)
      out.push_back({{"id", acts[k].id}, {"i", acts[k].i}, {"j", acts[k].j}, {"p", acts[k].prob}});
    return out;
  };
  for (size_t r = 0; r < cap.g1.size(); r++) {
    const TokenExperts te = token_experts(cap, 0, r, c.moe_heads, c.moe_experts, g.experts_threshold, g.mask.get());
    json jg = {{"group", r}, {"count", te.kept.size()}, {"experts", list(te.kept)}};
    if (g.mask) jg["removed"] = list(te.removed);
    groups.push_back(jg);
  }
  return {{"token_id", ev.id}, {"groups", groups}};
}

json usage_json(const GenSpec& g, const Job& job) {
  int64_t prompt = 0, completion = 0;
  for (const PromptIn& p : g.prompts) prompt += int64_t(p.ids.size());
  for (const Choice& ch : job.choices) completion += ch.result.generated_tokens;
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

std::string finish_reason_of(const BatchResult& r) { return r.finish_reason == "length" ? "length" : "stop"; }

// Submits every choice of the request to the scheduler.
std::shared_ptr<Job> start_job(Server::State& st, const GenSpec& g) {
  auto job = std::make_shared<Job>();
  job->choices.resize(g.prompts.size() * size_t(g.n));
  uint64_t seed = g.sampling.seed;
  if (!g.seed_given) seed = std::random_device{}() * 0x9E3779B97F4A7C15ull + std::random_device{}();
  std::vector<BatchRequest> reqs;
  for (size_t p = 0; p < g.prompts.size(); p++) {
    const int64_t max_tokens = max_tokens_for(st, g, g.prompts[p]);
    for (int k = 0; k < g.n; k++) {
      const size_t index = p * size_t(g.n) + size_t(k);
      job->choices[index].prompt = p;
      BatchRequest r;
      r.prompt = g.prompts[p].ids;
      r.embeds = g.prompts[p].embeds;
      r.max_tokens = max_tokens;
      r.sampling = g.sampling;
      r.sampling.seed = seed + index;
      r.stop_ids = g.stop_ids;
      r.stop_strings = g.stops;
      r.mask = g.mask;
      r.logprobs = g.logprobs;
      r.prompt_logprobs = !g.chat && g.echo && g.logprobs >= 0;
      r.routing = g.return_experts;
      r.on_token = [job, index](const TokenEvent& ev) {
        std::lock_guard<std::mutex> lock(job->mu);
        job->choices[index].events.push_back(ev);
        job->cv.notify_all();
        return !job->cancelled.load();
      };
      r.on_done = [job, index](const BatchResult& res) {
        std::lock_guard<std::mutex> lock(job->mu);
        job->choices[index].done = true;
        job->choices[index].result = res;
        job->cv.notify_all();
      };
      reqs.push_back(std::move(r));
    }
  }
  if (st.scheduler->queue_full()) throw ApiError(429, "the server is busy: the request queue is full; retry later", "", "queue_full", "rate_limit_error");
  for (size_t k = 0; k < reqs.size(); k++) {
    try {
      job->choices[k].id = st.scheduler->submit(std::move(reqs[k]));
    } catch (const Error& e) {
      job->cancelled = true;
      for (size_t j = 0; j < k; j++) st.scheduler->cancel(job->choices[j].id);
      if (st.scheduler->queue_full()) throw ApiError(429, e.what(), "", "queue_full", "rate_limit_error");
      if (st.stopping) throw ApiError(503, e.what(), "", "shutting_down");
      bad("", e.what());
    }
  }
  return job;
}

void cancel_job(Server::State& st, Job& job) {
  job.cancelled = true;
  std::lock_guard<std::mutex> lock(job.mu);
  for (const Choice& ch : job.choices)
    if (!ch.done) st.scheduler->cancel(ch.id);
}

// Folds a choice's event into what it has collected; returns the chunk's
// choice fields for streaming (text, logprobs, token ids, experts).
json absorb_event(const Server::State& st, const GenSpec& g, Choice& ch, const TokenEvent& ev) {
  const Tokenizer& tok = *st.served.tok;
  json delta = json::object();
  const size_t offset = ch.text.size();
  ch.text += ev.text;
  ch.ids.push_back(ev.id);
  delta["text"] = ev.text;
  if (g.logprobs >= 0) {
    if (g.chat) {
      json item = chat_logprob(tok, ev.logprob);
      ch.logprob_items.push_back(item);
      delta["logprobs"] = {{"content", json::array({item})}};
    } else {
      json item = {{"id", ev.id}, {"logprob", ev.logprob.logprob}, {"offset", offset}};
      json top = json::object();
      for (const auto& [id, l] : ev.logprob.top) top.emplace(tok.token_text(id), l);  // same text: the likelier one
      item["top"] = top;
      ch.logprob_items.push_back(item);
      delta["logprobs"] = {{"tokens", {tok.token_text(ev.id)}}, {"token_logprobs", {ev.logprob.logprob}},
                           {"top_logprobs", {top}}, {"text_offset", {offset}}};
    }
  }
  if (g.return_token_ids) delta["token_ids"] = {ev.id};
  if (g.return_experts) {
    json e = experts_json(st, g, ev);
    ch.experts.push_back(e);
    delta["experts"] = json::array({e});
  }
  return delta;
}

// Completions' logprobs of the echoed prompt (first token: none).
json prompt_logprob_items(const Tokenizer& tok, const PromptIn& p, const BatchResult& r) {
  json items = json::array();
  size_t offset = 0;
  for (size_t t = 0; t < p.ids.size(); t++) {
    json item = {{"id", p.ids[t]}, {"offset", offset}};
    if (t > 0 && t - 1 < r.prompt_logprobs.size()) {
      const TokenLogprob& lp = r.prompt_logprobs[t - 1];
      item["logprob"] = lp.logprob;
      json top = json::object();
      for (const auto& [id, l] : lp.top) top.emplace(tok.token_text(id), l);  // same text: the likelier one
      item["top"] = top;
    } else {
      item["logprob"] = nullptr;
      item["top"] = nullptr;
    }
    offset += tok.token_bytes(p.ids[t], t == 0).size();
    items.push_back(item);
  }
  return items;
}

json completion_logprobs_json(const Tokenizer& tok, const json& items, size_t shift) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const json& it : items) {
    tokens.push_back(tok.token_text(it["id"].get<int32_t>()));
    lps.push_back(it["logprob"]);
    tops.push_back(it["top"]);
    offs.push_back(it["offset"].get<size_t>() + shift);
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

std::string response_id(Server::State& st, bool chat) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)(st.next_response_id++ * 0x9E3779B97F4A7C15ull));
  return std::string(chat ? "chatcmpl-" : "cmpl-") + buf;
}

// The whole (non-streamed) response once every choice is done.
json full_response(Server::State& st, const GenSpec& g, Job& job, const std::string& id) {
  const Tokenizer& tok = *st.served.tok;
  json choices = json::array();
  for (size_t k = 0; k < job.choices.size(); k++) {
    Choice& ch = job.choices[k];
    while (!ch.events.empty()) {
      absorb_event(st, g, ch, ch.events.front());
      ch.events.pop_front();
    }
    ch.text += ch.result.tail;
    json c;
    if (g.chat) {
      c = {{"index", k}, {"message", {{"role", "assistant"}, {"content", ch.text}}},
           {"logprobs", g.logprobs >= 0 ? json({{"content", ch.logprob_items}}) : json(nullptr)},
           {"finish_reason", finish_reason_of(ch.result)}};
    } else {
      const PromptIn& p = g.prompts[ch.prompt];
      const std::string prefix = g.echo ? p.echo_text : "";
      json lp = nullptr;
      if (g.logprobs >= 0) {
        json items = json::array();
        if (g.echo)
          for (const json& it : prompt_logprob_items(tok, p, ch.result)) items.push_back(it);
        json gen = completion_logprobs_json(tok, ch.logprob_items, prefix.size());
        json pro = completion_logprobs_json(tok, items, 0);
        for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
          for (const json& x : gen[key]) pro[key].push_back(x);
        lp = pro;
      }
      c = {{"index", k}, {"text", prefix + ch.text}, {"logprobs", lp}, {"finish_reason", finish_reason_of(ch.result)}};
    }
    if (g.return_token_ids) c["token_ids"] = ch.ids;
    if (g.return_experts) c["experts"] = ch.experts;
    choices.push_back(c);
  }
  return {{"id", id}, {"object", g.chat ? "chat.completion" : "text_completion"}, {"created", std::time(nullptr)},
          {"model", st.model_name}, {"choices", choices}, {"usage", usage_json(g, job)}};
}

const char* first_error(const Job& job) {
  for (const Choice& ch : job.choices)
    if (ch.result.finish_reason == "error") return ch.result.error.c_str();
  return nullptr;
}

// One streamed chunk of a choice.
json chunk(Server::State& st, const GenSpec& g, const std::string& id, size_t index, const json& delta,
           const json& finish) {
  json c = {{"index", index}};
  if (g.chat) {
    json d = json::object();
    if (delta.contains("role")) d["role"] = delta["role"];
    if (delta.contains("text")) d["content"] = delta["text"];
    c["delta"] = d;
    c["logprobs"] = delta.contains("logprobs") ? delta["logprobs"] : json(nullptr);
  } else {
    c["text"] = delta.contains("text") ? delta["text"] : json("");
    c["logprobs"] = delta.contains("logprobs") ? delta["logprobs"] : json(nullptr);
  }
  c["finish_reason"] = finish;
  if (delta.contains("token_ids")) c["token_ids"] = delta["token_ids"];
  if (delta.contains("experts")) c["experts"] = delta["experts"];
  return {{"id", id}, {"object", g.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", std::time(nullptr)}, {"model", st.model_name}, {"choices", json::array({c})}};
}

std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

// A non-streamed response not ready after this long is answered through a
// chunked body (below), so that a client that goes away is noticed.
constexpr auto kPlainAnswerWait = std::chrono::milliseconds(300);
constexpr auto kGoneCheckEvery = std::chrono::milliseconds(200);

bool all_choices_done(const Job& job) {
  return std::all_of(job.choices.begin(), job.choices.end(), [](const Choice& c) { return c.done; });
}

// Frees the slots of a job whose response ends before its choices do (the
// client went away), and ends its in-flight count.
auto job_releaser(Server::State& st, std::shared_ptr<Job> job) {
  return [&st, job](bool) {
    bool unfinished = false;
    {
      std::lock_guard<std::mutex> lock(job->mu);
      unfinished = !all_choices_done(*job);
    }
    if (unfinished) cancel_job(st, *job);
    st.in_flight--;
  };
}

void run_generation(Server::State& st, const GenSpec& g, httplib::Response& res) {
  std::shared_ptr<Job> job = start_job(st, g);
  const std::string id = response_id(st, g.chat);
  st.in_flight++;
  if (!g.stream) {
    bool finished = false;
    {
      std::unique_lock<std::mutex> lock(job->mu);
      finished = job->cv.wait_for(lock, kPlainAnswerWait, [&] { return all_choices_done(*job); });
    }
    if (finished) {
      st.in_flight--;
      if (const char* err = first_error(*job)) throw ApiError(500, std::string("generation failed: ") + err);
      res.set_content(dump(full_response(st, g, *job, id)), "application/json");
      return;
    }
    // Still generating: the answer goes out as a chunked body, written once
    // every choice is done, so that httplib watches the connection meanwhile.
    // A handler has no socket, but a sink's is_writable() turns false once the
    // peer has closed (httplib 0.11.4 checks that the socket is alive, and
    // checks it before each call of the provider too): the job is cancelled and
    // its slots free before the scheduler's next step. The status (200) is
    // sent now: a generation failure from here on is an error object in the body.
    auto provider = [&st, g, job, id](size_t, httplib::DataSink& sink) {
      bool done = false;
      {
        std::unique_lock<std::mutex> lock(job->mu);
        done = job->cv.wait_for(lock, kGoneCheckEvery, [&] { return all_choices_done(*job); });
      }
      if (!done) {
        if (sink.is_writable()) return true;
        cancel_job(st, *job);
        return false;
      }
      const char* err = first_error(*job);
      const std::string out = err ? dump(error_json(500, std::string("generation failed: ") + err, "", "", ""))
                                  : dump(full_response(st, g, *job, id));
      if (!sink.write(out.data(), out.size())) return false;
      sink.done();
      return true;
    };
    res.set_chunked_content_provider("application/json", provider, job_releaser(st, job));
    return;
  }
  const Tokenizer* tok = st.served.tok.get();
  auto provider = [&st, g, job, id, tok](size_t, httplib::DataSink& sink) {
    std::string out;
    bool all_done = true;
    {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait_for(lock, std::chrono::milliseconds(500), [&] {
        for (const Choice& c : job->choices)
          if (!c.events.empty() || (c.done && !c.reported) || !c.started) return true;
        return false;
      });
      for (size_t k = 0; k < job->choices.size(); k++) {
        Choice& ch = job->choices[k];
        if (!ch.started) {
          ch.started = true;
          if (g.chat) {
            out += sse(chunk(st, g, id, k, {{"role", "assistant"}, {"text", ""}}, nullptr));
          } else if (g.echo) {
            json delta = {{"text", g.prompts[ch.prompt].echo_text}};
            if (g.logprobs >= 0 && ch.done) {}  // prompt logprobs come with the first tokens below
            out += sse(chunk(st, g, id, k, delta, nullptr));
          }
        }
        while (!ch.events.empty()) {
          json delta = absorb_event(st, g, ch, ch.events.front());
          ch.events.pop_front();
          if (delta["text"].get<std::string>().empty() && !delta.contains("logprobs") && !delta.contains("token_ids") &&
              !delta.contains("experts"))
            continue;
          out += sse(chunk(st, g, id, k, delta, nullptr));
        }
        if (ch.done && !ch.reported) {
          ch.reported = true;
          if (ch.result.finish_reason == "error") {
            out += sse(error_json(500, "generation failed: " + ch.result.error, "", "", ""));
          } else {
            json delta = json::object();
            if (!ch.result.tail.empty()) delta["text"] = ch.result.tail;
            out += sse(chunk(st, g, id, k, delta, finish_reason_of(ch.result)));
          }
        }
        if (!ch.reported) all_done = false;
      }
      if (all_done && g.include_usage) {
        json u = {{"id", id}, {"object", g.chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", std::time(nullptr)}, {"model", st.model_name}, {"choices", json::array()},
                  {"usage", usage_json(g, *job)}};
        out += sse(u);
      }
    }
    (void)tok;
    if (all_done) out += "data: [DONE]\n\n";
    // Nothing to send for a while (queued, or a long prefill): an SSE comment,
    // which clients ignore, tells whether the client is still there.
    if (out.empty()) out = ": waiting\n\n";
    if (!out.empty() && !sink.write(out.data(), out.size())) {
      cancel_job(st, *job);  // the client went away: its slots free before the next step
      return false;
    }
    if (all_done) sink.done();
    return true;
  };
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider("text/event-stream", provider, job_releaser(st, job));
}

json parse_body(const httplib::Request& req) {
  try {
    json body = json::parse(req.body);
    if (!body.is_object()) bad("", "the request body must be a JSON object");
    return body;
  } catch (const json::exception& e) {
    bad("", std::string("the request body is not valid JSON: ") + e.what());
  }
}

bool is_api_path(const std::string& path) {
  return path.rfind("/v1/", 0) == 0 || path == "/tokenize" || path == "/detokenize" || path == "/metrics";
}

}  // namespace

httplib::Server::HandlerResponse pre_route(Server::State& st, const httplib::Request& req, httplib::Response& res) {
  st.http_requests++;
  if (!is_api_path(req.path)) return httplib::Server::HandlerResponse::Unhandled;
  if (!st.opts.api_key.empty()) {
    const std::string auth = req.get_header_value("Authorization");
    if (auth != "Bearer " + st.opts.api_key) {
      send_error(res, 401, auth.empty() ? "missing API key: send \"Authorization: Bearer KEY\"" : "invalid API key", "",
                 "invalid_api_key");
      return httplib::Server::HandlerResponse::Handled;
    }
  }
  if (st.stopping) {
    send_error(res, 503, "the server is shutting down", "", "shutting_down");
    return httplib::Server::HandlerResponse::Handled;
  }
  if (!st.ready) {
    send_error(res, 503, "the model is loading", "", "loading");
    return httplib::Server::HandlerResponse::Handled;
  }
  return httplib::Server::HandlerResponse::Unhandled;
}

httplib::Server::HandlerResponse on_error_response(Server::State& st, const httplib::Request& req,
                                                   httplib::Response& res) {
  st.http_errors++;
  if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
  std::string message = "error";
  if (res.status == 404) message = "no route " + req.method + " " + req.path;
  else if (res.status == 413) message = "the request body is larger than " + std::to_string(st.opts.max_body_bytes) + " bytes";
  else if (res.status == 400) message = "malformed HTTP request";
  else if (res.status == 405) message = "method not allowed";
  res.set_content(dump(error_json(res.status, message, "", "", "")), "application/json");
  return httplib::Server::HandlerResponse::Handled;
}

void add_openai_routes(Server::State& st) {
  auto get = [&st](const char* path, httplib::Server::Handler h) { st.routes.push_back({"GET", path, std::move(h)}); };
  auto post = [&st](const char* path, httplib::Server::Handler h) { st.routes.push_back({"POST", path, std::move(h)}); };

  // Route bodies run with errors mapped to OpenAI-shaped responses.
  auto api = [&st](auto fn) {
    return [&st, fn](const httplib::Request& req, httplib::Response& res) {
      try {
        fn(req, res);
      } catch (const ApiError& e) {
        send_error(res, e.status, e.what(), e.param, e.code, e.type);
      } catch (const Error& e) {
        send_error(res, 400, e.what());
      } catch (const std::exception& e) {
        send_error(res, 500, std::string("internal error: ") + e.what());
      }
    };
  };

  get("/health", [&st](const httplib::Request&, httplib::Response& res) {
    if (st.load_error) {
      send_error(res, 500, "the model failed to load");
    } else if (!st.ready) {
      res.status = 503;
      res.set_content(R"({"status":"loading"})", "application/json");
    } else {
      res.set_content(R"({"status":"ok"})", "application/json");
    }
  });
  get("/v1/models", api([&st](const httplib::Request&, httplib::Response& res) {
    json m = {{"id", st.model_name}, {"object", "model"}, {"created", st.created_unix}, {"owned_by", "monet"},
              {"root", st.served.model->dir()}, {"max_model_len", st.context}};
    res.set_content(dump({{"object", "list"}, {"data", json::array({m})}}), "application/json");
  }));
  post("/tokenize", api([&st](const httplib::Request& req, httplib::Response& res) {
    const json body = parse_body(req);
    only_fields(body, {"content", "prompt", "add_special", "model"}, "the request");
    if (field(body, "model")) check_model(st, body);
    const json* text = field(body, "content");
    if (!text) text = field(body, "prompt");
    if (!text || !text->is_string()) bad("content", "\"content\" (or \"prompt\") must be a string");
    const bool add_special = get_bool(body, "add_special", true);
    const std::vector<int32_t> ids = st.served.tok->encode(text->get<std::string>(), add_special);
    res.set_content(dump({{"tokens", ids}, {"count", ids.size()}, {"max_model_len", st.context}}), "application/json");
  }));
  post("/detokenize", api([&st](const httplib::Request& req, httplib::Response& res) {
    const json body = parse_body(req);
    only_fields(body, {"tokens", "model", "skip_special"}, "the request");
    if (field(body, "model")) check_model(st, body);
    const json* tokens = field(body, "tokens");
    if (!tokens || !tokens->is_array()) bad("tokens", "\"tokens\" must be a list of token ids");
    const std::vector<int32_t> ids = parse_ids(*tokens, "tokens", st.served.model->config().vocab_size);
    const std::string text = st.served.tok->decode(ids, get_bool(body, "skip_special", true));
    res.set_content(dump({{"content", text}, {"prompt", text}}), "application/json");
  }));
  get("/metrics", api([&st](const httplib::Request&, httplib::Response& res) {
    const SchedulerStats s = st.scheduler->stats();
    const double up = std::chrono::duration<double>(std::chrono::steady_clock::now() - st.started).count();
    std::string out;
    auto metric = [&](const char* name, const char* type, const char* help, double value) {
      char line[64];
      std::snprintf(line, sizeof line, "%.17g", value);
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " + line + "\n";
    };
    metric("monet_requests_total", "counter", "Generation requests (choices) accepted.", double(s.requests));
    metric("monet_requests_finished_total", "counter", "Generation requests finished (any reason).", double(s.finished));
    metric("monet_requests_cancelled_total", "counter", "Generation requests cancelled (client gone).", double(s.cancelled));
    metric("monet_requests_failed_total", "counter", "Generation requests that failed.", double(s.errors));
    metric("monet_prompt_tokens_total", "counter", "Prompt tokens processed.", double(s.prompt_tokens));
    metric("monet_generated_tokens_total", "counter", "Tokens generated.", double(s.generated_tokens));
    metric("monet_engine_steps_total", "counter", "Batched engine steps run.", double(s.steps));
    metric("monet_engine_busy_seconds_total", "counter", "Seconds spent in engine steps.", s.busy_seconds);
    metric("monet_generated_tokens_per_second", "gauge", "Generated tokens per second of engine time.",
           s.busy_seconds > 0 ? double(s.generated_tokens) / s.busy_seconds : 0.0);
    metric("monet_queue_length", "gauge", "Requests waiting for a slot.", double(s.queued));
    metric("monet_busy_slots", "gauge", "Slots decoding now.", double(s.active));
    metric("monet_slots", "gauge", "Slots (--parallel).", double(s.parallel));
    metric("monet_http_requests_total", "counter", "HTTP requests received.", double(st.http_requests.load()));
    metric("monet_http_errors_total", "counter", "HTTP responses with status >= 400.", double(st.http_errors.load()));
    metric("monet_uptime_seconds", "gauge", "Seconds since the server started.", up);
    res.set_content(out, "text/plain; version=0.0.4");
  }));
  post("/v1/completions", api([&st](const httplib::Request& req, httplib::Response& res) {
    const GenSpec g = parse_completion(st, parse_body(req));
    run_generation(st, g, res);
  }));
  post("/v1/chat/completions", api([&st](const httplib::Request& req, httplib::Response& res) {
    const GenSpec g = parse_chat(st, parse_body(req));
    run_generation(st, g, res);
  }));
}

}  // namespace monet
