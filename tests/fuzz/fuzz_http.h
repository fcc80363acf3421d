// Shared by the HTTP fuzz targets: the server's route handlers, called
// without a socket through monet::dispatch (the same code httplib calls), on
// the default model (models/monet-vd-books, one thread, a 32-position context
// so that any max_tokens is short). httplib's own HTTP parser is not fuzzed.
//
// An input is three parts cut at NUL bytes:
//   1. the request head: "METHOD /path?a=1&b=2", then "Name: value" lines;
//   2. how the client reads a response body: "" (to its end), or "wN" / "xN":
//      the connection goes after N calls of the content provider (w:
//      is_writable() turns false; x: writes fail), as a client that disconnects;
//   3. the request body (any bytes).
// Properties checked: every answer has a known status; errors and JSON
// answers parse; streams are well-formed server-sent events; and once a
// response is over (read to its end or abandoned) the scheduler is idle and
// no request is left in flight (no slot is leaked).
#pragma once
#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "fuzz_util.h"
#include "monet/error.h"
#include "monet/index.h"
#include "monet/model.h"
#include "monet/server.h"
#include "monet/tokenizer.h"
#include "server/server_state.h"

namespace monet_fuzz {

inline const std::string kFuzzModelDir = MONET_SOURCE_DIR "/models/monet-vd-books";

// The state of a server that has loaded the default model (once per process).
inline monet::Server::State& http_state(const std::string& index_path, const std::string& api_key) {
  static monet::Server::State* state = [&] {
    auto* st = new monet::Server::State();  // lives until the process ends
    st->opts.parallel = 2;
    st->opts.context = 32;
    st->opts.max_probe_tokens = 32;
    st->opts.max_queue = 8;
    st->opts.api_key = api_key;
    monet::add_openai_routes(*st);
    monet::add_viewer_routes(*st);
    monet::LoadOptions lo;
    lo.threads = 1;
    monet::ServedModel served;
    served.model = monet::Model::load(kFuzzModelDir, lo);
    served.tok = monet::Tokenizer::load_dir(kFuzzModelDir);
    if (!index_path.empty()) {  // a copy: SQLite adds files beside a database it opens
      const std::filesystem::path copy = scratch_dir() / "viewer-index.db";
      std::filesystem::copy_file(index_path, copy, std::filesystem::copy_options::overwrite_existing);
      served.index = std::make_unique<monet::IndexReader>(copy.string());
    }
    if (!monet::install_model(*st, std::move(served))) std::abort();
    return st;
  }();
  return *state;
}

inline void parse_head(const std::string& head, httplib::Request& req) {
  size_t at = 0;
  bool first = true;
  while (at <= head.size()) {
    size_t end = head.find('\n', at);
    if (end == std::string::npos) end = head.size();
    const std::string line = head.substr(at, end - at);
    at = end + 1;
    if (first) {
      first = false;
      const size_t space = line.find(' ');
      req.method = line.substr(0, space);
      std::string target = space == std::string::npos ? "" : line.substr(space + 1);
      const size_t q = target.find('?');
      req.path = target.substr(0, q);
      if (q != std::string::npos) {
        const std::string query = target.substr(q + 1);
        size_t p = 0;
        while (p <= query.size()) {
          size_t amp = query.find('&', p);
          if (amp == std::string::npos) amp = query.size();
          const std::string kv = query.substr(p, amp - p);
          const size_t eq = kv.find('=');
          if (!kv.empty()) req.params.emplace(kv.substr(0, eq), eq == std::string::npos ? "" : kv.substr(eq + 1));
          p = amp + 1;
        }
      }
      continue;
    }
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    size_t v = colon + 1;
    while (v < line.size() && line[v] == ' ') v++;
    req.headers.emplace(line.substr(0, colon), line.substr(v));
  }
}

// The JSON of a body that may start with whitespace (slow non-streamed answers).
inline bool parses(const std::string& body) { return nlohmann::json::accept(body); }

inline void check_events(const std::string& body, bool complete) {
  size_t at = 0;
  bool saw_done = false;
  while (at < body.size()) {
    const size_t end = body.find("\n\n", at);
    FUZZ_CHECK(end != std::string::npos);  // events end with a blank line
    const std::string event = body.substr(at, end - at);
    at = end + 2;
    if (event.rfind(": ", 0) == 0) continue;  // a comment (keep-alive)
    FUZZ_CHECK(event.rfind("data: ", 0) == 0);
    const std::string data = event.substr(6);
    FUZZ_CHECK(!saw_done);
    if (data == "[DONE]") saw_done = true;
    else FUZZ_CHECK(parses(data));
  }
  if (complete) FUZZ_CHECK(saw_done);
}

inline void wait_idle(monet::Server::State& st) {
  // Cancelled slots free before the scheduler's next step: bounded, not instant.
  for (int k = 0; k < 20000; k++) {
    const monet::SchedulerStats s = st.scheduler->stats();
    if (s.active == 0 && s.queued == 0 && st.in_flight == 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::fprintf(stderr, "the scheduler is not idle 20 s after the response ended (active %lld, queued %lld, in flight %lld)\n",
               (long long)st.scheduler->stats().active, (long long)st.scheduler->stats().queued,
               (long long)st.in_flight.load());
  std::abort();
}

inline int run_http_input(monet::Server::State& st, const uint8_t* data, size_t size) {
  const std::vector<std::string> parts = split(data, size, 3);
  httplib::Request req;
  parse_head(parts[0], req);
  req.body = parts[2];
  char gone_by = 0;
  long gone_after = -1;
  if (!parts[1].empty() && (parts[1][0] == 'w' || parts[1][0] == 'x')) {
    gone_by = parts[1][0];
    gone_after = std::strtol(parts[1].c_str() + 1, nullptr, 10) % 64;
  }
  {
    httplib::Response res;
    monet::dispatch(st, req, res);
    const int s = res.status;
    // MONET_FUZZ_VERBOSE=1: what each input got (to check that the seeds are answered as meant).
    if (std::getenv("MONET_FUZZ_VERBOSE"))
      std::fprintf(stderr, "%s %s -> %d %.300s\n", req.method.c_str(), req.path.c_str(), s, res.body.c_str());
    FUZZ_CHECK(s == 200 || s == 400 || s == 401 || s == 404 || s == 413 || s == 429 || s == 500 || s == 503);
    const bool api = req.path.rfind("/api/", 0) == 0 || req.path.rfind("/v1/", 0) == 0 || req.path == "/tokenize" ||
                     req.path == "/detokenize" || req.path == "/health";
    if (s != 200) {
      FUZZ_CHECK(!res.content_provider_);  // errors are answered before any body
      FUZZ_CHECK(parses(res.body));
      FUZZ_CHECK(nlohmann::json::parse(res.body).contains("error"));
    } else if (!res.content_provider_) {
      if (api) FUZZ_CHECK(parses(res.body));
    } else {
      FUZZ_CHECK(res.is_chunked_content_provider_);
      const bool events = res.get_header_value("Content-Type") == "text/event-stream";
      std::string body;
      long calls = 0;
      bool connected = true, done = false;
      httplib::DataSink sink;
      sink.write = [&](const char* d, size_t n) {
        if (!connected) return false;
        if (gone_by == 'x' && calls >= gone_after) {
          connected = false;
          return false;
        }
        body.append(d, n);
        return true;
      };
      sink.is_writable = [&] { return connected && !(gone_by == 'w' && calls >= gone_after); };
      sink.done = [&] { done = true; };
      // As httplib's chunked writer: check the connection, call the provider, stop on false.
      for (; !done; calls++) {
        FUZZ_CHECK(calls < 1000000);
        if (!sink.is_writable()) break;
        if (!res.content_provider_(body.size(), 0, sink)) break;
        if (!connected) break;
      }
      if (std::getenv("MONET_FUZZ_VERBOSE")) std::fprintf(stderr, "  streamed: %.300s\n", body.c_str());
      if (done) {
        res.content_provider_success_ = true;
        if (events) check_events(body, true);
        else FUZZ_CHECK(parses(body));
      } else if (events) {
        check_events(body, false);
      }
    }
  }  // the response's end: its content provider's releaser runs here
  wait_idle(st);
  return 0;
}

}  // namespace monet_fuzz
