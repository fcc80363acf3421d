// The OpenAI-compatible routes (/v1/completions, /v1/chat/completions,
// /tokenize, /detokenize, /v1/models, /metrics, /health) behind an API key
// ("Authorization: Bearer fuzz-key"), streamed or not, with clients that
// disconnect midway. Input format and properties: fuzz_http.h.
#include "fuzz_http.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  monet::Server::State& st = monet_fuzz::http_state("", "fuzz-key");
  return monet_fuzz::run_http_input(st, data, size);
}
