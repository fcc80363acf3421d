// What the tokenizer targets check on a tokenizer that loaded: encoding and
// decoding of a text, and decoding of arbitrary ids.
#pragma once
#include <cstring>

#include "fuzz_util.h"
#include "monet/error.h"
#include "monet/tokenizer.h"

namespace monet_fuzz {

inline void exercise_tokenizer(const monet::Tokenizer& tok, const std::string& text) {
  const int32_t vocab = tok.vocab_size();
  for (bool add_special : {true, false}) {
    std::vector<int32_t> ids;
    try {
      ids = tok.encode(text, add_special);
    } catch (const monet::Error&) {
      continue;  // a character the tokenizer cannot encode (no unk, no byte fallback)
    }
    for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < vocab);  // only ids of the vocabulary
    for (bool skip : {true, false}) {
      const std::string whole = tok.decode(ids, skip);
      monet::StreamDecoder stream(tok, skip);
      std::string streamed;
      for (int32_t id : ids) streamed += stream.feed(id);
      streamed += stream.flush();
      FUZZ_CHECK(streamed == whole);  // documented: feed + flush == decode
    }
    for (size_t k = 0; k < ids.size() && k < 64; k++) {
      (void)tok.piece(ids[k]);
      (void)tok.token_text(ids[k]);
      (void)tok.token_bytes(ids[k], k == 0);
    }
  }
  // Any ids decode (ids beyond the vocabulary to nothing, as HF).
  std::vector<int32_t> raw(std::min<size_t>(text.size() / 4, 256));
  if (!raw.empty()) std::memcpy(raw.data(), text.data(), raw.size() * 4);
  raw.push_back(vocab);
  raw.push_back(-1);
  (void)tok.decode(raw, true);
  (void)tok.decode(raw, false);
  for (int32_t id : raw) {
    (void)tok.token_text(id);
    try {
      (void)tok.piece(id);
      FUZZ_CHECK(id >= 0 && id < vocab);
    } catch (const monet::Error&) {
      FUZZ_CHECK(id < 0 || id >= vocab);
    }
  }
  (void)tok.token_id(text);
}

}  // namespace monet_fuzz
