// `monet serve`: the expert viewer's HTTP server.
#pragma once
#include <functional>
#include <string>

#include "monet/index.h"
#include "monet/model.h"
#include "monet/tokenizer.h"

namespace monet {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  int64_t max_probe_tokens = 1024;
  std::function<void(const std::string& host, int port)> on_ready;  // called once listening
};

// Serves until the process ends. `index` may be null (probe and output tokens only).
void serve(const Model& model, const Tokenizer& tok, const IndexReader* index, const ServeOptions& opts);

}  // namespace monet
