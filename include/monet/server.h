// `monet serve`: one HTTP server for the expert viewer (/, /api/*, with an
// index) and an OpenAI-compatible inference API (/v1/completions,
// /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health,
// /metrics) with continuous batching (monet/scheduler.h).
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "monet/index.h"
#include "monet/model.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"

namespace monet {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  int64_t max_probe_tokens = 1024;
  int parallel = 4;              // requests decoded together in one batched step
  int64_t context = 0;           // positions per request (prompt + generated); 0: max_position_embeddings
  int64_t max_queue = 512;       // requests waiting for a slot beyond `parallel` (more: 429)
  int64_t max_tokens_limit = 0;  // largest max_tokens accepted; 0: the context
  size_t max_body_bytes = size_t(8) << 20;  // larger request bodies: 413
  int http_threads = 128;        // connections served at once
  std::string api_key;           // non-empty: /v1/*, /tokenize, /detokenize and /metrics need "Authorization: Bearer KEY"
  std::string model_name;        // the id /v1/models lists; "": the checkpoint directory's name
  std::string chat_template;     // "llama2", "mistral", "chatml"; "": from tokenizer_config.json
  std::function<void(const std::string& host, int port)> on_ready;  // called once listening (before loading)
  std::function<void()> on_loaded;                                  // called once the model is loaded
};

// What the server serves, built by the loader passed to Server::run.
struct ServedModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<IndexReader> index;  // may be null (the viewer's probe and output tokens only)
  std::unique_ptr<VisionTower> vision;  // VisionMonet: chat messages may carry images (data: URLs)
};

class Server {
 public:
  explicit Server(ServeOptions opts);
  ~Server();
  // Listens (monet::Error if it cannot), calls `load` on a background thread
  // (/health answers 503 until it returns) and serves until shutdown(). A
  // loader's error stops the server and is rethrown here.
  void run(const std::function<ServedModel()>& load);
  // Any thread: refuses new requests, finishes the ones in flight, then run() returns.
  void shutdown();

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace monet
