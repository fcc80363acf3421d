// Sampling, stop strings and the generation loop.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "monet/chat.h"
#include "monet/model.h"
#include "monet/tokenizer.h"

namespace monet {

struct SamplingParams {
  float temperature = 0.8f;  // 0: greedy (argmax, lowest id on ties)
  int top_k = 40;            // 0: off
  float top_p = 0.95f;       // 1: off
  float min_p = 0.0f;        // 0: off
  float repeat_penalty = 1.0f;  // 1: off (HF/CTRL rule: divide positive logits, multiply negative)
  int repeat_last_n = 64;       // how many recent tokens the penalty looks at (-1: all)
  uint64_t seed = 0;
};

// Turns logits into a token id. Order as HF's warpers: repetition penalty,
// temperature, top-k, top-p, min-p, then a draw from the seeded generator.
// Non-finite logits are an error, never sampled from.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // monet::Error for values out of range
  int32_t sample(const float* logits, int64_t vocab, const std::vector<int32_t>& history);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

// Holds back text that could be the start of a stop string; reports a stop
// string once it is complete (the text before it is emitted, the rest not).
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);  // monet::Error for an empty stop string
  // Appends text; returns what may be emitted now. Sets stopped() when a stop string completed.
  std::string feed(const std::string& text);
  std::string flush();  // what is held back, once the generation ends without a stop string
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prompt_seconds = 0, generate_seconds = 0;
  bool hit_context_end = false;  // stopped because max_position_embeddings was reached
};

struct GenerateOptions {
  int64_t max_tokens = 128;
  std::vector<int32_t> stop_ids;          // e.g. the EOS ids; never part of the output
  std::vector<std::string> stop_strings;  // generate_text: end when one appears (it is not part of the text)
  SamplingParams sampling;
  const ExpertMask* mask = nullptr;
};

// Feeds `prompt` (after whatever `cache` already holds), then samples up to
// max_tokens tokens (fewer where the context ends), calling on_token for each; on_token returning false
// stops. Returns the generated ids (without a stop id that ended it).
std::vector<int32_t> generate(const Model& model, KvCache& cache, const std::vector<int32_t>& prompt,
                              const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token,
                              GenerateStats* stats = nullptr);

struct GenerateResult {
  std::vector<int32_t> ids;   // generated ids (a stop id excluded; a stop string's tokens included)
  std::string text;           // their text, cut before a stop string
  std::string finish_reason;  // "stop" (stop id or string), "length" (max_tokens or the context end), "cancelled"
  GenerateStats stats;
};

// generate() with text: decodes as it goes (StreamDecoder), applies the stop
// strings and calls on_text with each piece of final text (nothing held
// back by a possible stop string is passed on early); on_text returning
// false cancels.
GenerateResult generate_text(const Model& model, const Tokenizer& tok, KvCache& cache,
                             const std::vector<int32_t>& prompt, const GenerateOptions& opts,
                             const std::function<bool(const std::string&)>& on_text = nullptr);

// The ids that end a reply: config eos ids, the tokenizer's EOS and, for
// ChatML, <|im_end|>.
std::vector<int32_t> chat_stop_ids(const MonetConfig& c, const Tokenizer& tok, ChatFormat format);

// A conversation with a chat checkpoint: renders it with the chat template
// and keeps the KV cache across turns, so each turn only processes the tokens
// that changed since the cache was filled.
class ChatSession {
 public:
  ChatSession(const Model& model, const Tokenizer& tok, ChatFormat format, std::vector<ChatMessage> messages = {});
  // Adds the user's message, generates the assistant's reply (appended to
  // messages()) and returns it; prompt_reused says how many prompt tokens
  // came from the cache.
  GenerateResult reply(const std::string& user_text, const GenerateOptions& opts,
                       const std::function<bool(const std::string&)>& on_text = nullptr,
                       int64_t* prompt_reused = nullptr);
  const std::vector<ChatMessage>& messages() const { return messages_; }
  ChatFormat format() const { return format_; }

 private:
  const Model& model_;
  const Tokenizer& tok_;
  ChatFormat format_;
  std::vector<ChatMessage> messages_;
  KvCache cache_;
  std::vector<int32_t> cached_;  // the tokens whose keys/values the cache holds
};

// The prompt text of a conversation for this tokenizer (BOS/EOS spelled out).
std::string render_chat_prompt(const Tokenizer& tok, ChatFormat format, const std::vector<ChatMessage>& messages,
                               bool add_generation_prompt);

}  // namespace monet
