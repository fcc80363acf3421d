// The expert viewer's routes (/api/info, /api/experts, /api/expert,
// /api/search, /api/probe) on the default model and the committed index seed
// (an index of that model). Input format and properties: fuzz_http.h.
#include "fuzz_http.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  monet::Server::State& st = monet_fuzz::http_state(MONET_SOURCE_DIR "/tests/fuzz/corpus/index/two-documents.db", "");
  return monet_fuzz::run_http_input(st, data, size);
}
