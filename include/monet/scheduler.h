// Continuous batching: one thread owns the model's decode loop and runs one
// batched engine step (Model::forward_batch) per iteration over up to
// `parallel` active requests. New requests join between steps (their prompt
// is prefilled in the same step as the others' decode tokens), finished or
// cancelled ones leave; requests beyond `parallel` wait in a queue.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "monet/generate.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/tokenizer.h"

namespace monet {

// The log-probability (log-softmax of the model's raw logits) of a token and
// of the most likely alternatives at its position.
struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // most likely first
};

// One generated token as the scheduler hands it over.
struct TokenEvent {
  int32_t id = -1;
  std::string text;          // final text this token adds (stream-decoded, stop strings held back and cut)
  TokenLogprob logprob;      // when BatchRequest::logprobs >= 0
  // When BatchRequest::routing: the router probabilities of this token (as the
  // input of the step after it), per router group [H*E] after threshold + softmax.
  std::vector<std::vector<float>> g1, g2;
};

struct BatchResult {
  std::string finish_reason;  // "stop", "length", "cancelled" or "error"
  std::string error;          // finish_reason "error": what went wrong
  std::string tail;           // final text released at the end (held back by the decoder or a possible stop string)
  int64_t prompt_tokens = 0, generated_tokens = 0;
  std::vector<TokenLogprob> prompt_logprobs;  // when asked: one per prompt token after the first
};

struct BatchRequest {
  std::vector<int32_t> prompt;  // at least one token
  // Optional input embeddings of the prompt [prompt.size(), hidden] (host
  // memory; VisionMonet prompts with images, whose positions hold kImageToken
  // in `prompt`). The last position must be text.
  std::shared_ptr<const std::vector<float>> embeds;
  int64_t max_tokens = 16;      // generation also ends at the scheduler's context
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;          // end the generation; never part of the output
  std::vector<std::string> stop_strings;  // end it once they appear (cut from the text)
  std::shared_ptr<const ExpertMask> mask;  // null: no mask
  int logprobs = -1;             // -1: none; k >= 0: each token's logprob and its k most likely alternatives
  bool prompt_logprobs = false;  // also the prompt tokens' (with `logprobs` alternatives)
  bool routing = false;          // each generated token's router probabilities
  // Called on the scheduler thread, in order; keep them short. on_token
  // returning false cancels the request. on_done is called exactly once.
  std::function<bool(const TokenEvent&)> on_token;
  std::function<void(const BatchResult&)> on_done;
};

struct SchedulerStats {
  int64_t requests = 0;        // submitted
  int64_t finished = 0;        // done, whatever the reason
  int64_t cancelled = 0, errors = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t steps = 0;           // batched engine steps
  double busy_seconds = 0;     // time spent in engine steps
  int64_t queued = 0, active = 0, parallel = 0;
};

class BatchScheduler {
 public:
  // context: the most positions one request may use (prompt + generated);
  // max_queue: requests waiting beyond `parallel` (submit refuses more).
  BatchScheduler(const Model& model, const Tokenizer& tok, int parallel, int64_t context, int64_t max_queue);
  ~BatchScheduler();  // finishes every request in flight and queued, then stops
  BatchScheduler(const BatchScheduler&) = delete;
  BatchScheduler& operator=(const BatchScheduler&) = delete;

  // Queues a request; returns its id. monet::Error for invalid requests
  // (sampling parameters, empty prompt, too long for the context) and when
  // the queue is full (queue_full() tells which) or the scheduler is stopping.
  uint64_t submit(BatchRequest req);
  void cancel(uint64_t id);  // frees its slot before the next step (on_done: "cancelled")
  // Stops taking requests; returns once every request in flight and queued is done.
  void drain();

  SchedulerStats stats() const;
  int64_t context() const { return context_; }
  bool queue_full() const;

 private:
  struct Slot;
  void loop();
  void step(std::vector<std::unique_ptr<Slot>>& active);
  void finish(Slot& s, const std::string& reason, const std::string& error = "");

  const Model& model_;
  const Tokenizer& tok_;
  const int parallel_;
  const int64_t context_, max_queue_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Slot>> queue_;
  std::vector<uint64_t> cancel_requests_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  int64_t active_count_ = 0;
  SchedulerStats stats_;
  std::thread thread_;
};

}  // namespace monet
