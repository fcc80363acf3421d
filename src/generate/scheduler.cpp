#include "monet/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>

#include "monet/error.h"

namespace monet {

struct BatchScheduler::Slot {
  uint64_t id = 0;
  BatchRequest req;
  Sampler sampler;
  StopMatcher stop;
  StreamDecoder decoder;
  KvCache cache;
  std::vector<int32_t> history;  // prompt + generated (the repetition penalty's window)
  std::vector<int32_t> feed;     // what the next step feeds
  int64_t max_tokens = 0;        // max_tokens cut to the context
  int64_t generated = 0;
  bool prefilled = false;
  bool finishing = false;        // the last token is fed only for its routing; then done
  std::string pending_reason;    // finishing: the reason it ends with
  bool cancel_requested = false;
  bool done = false;
  TokenEvent held;               // with routing: the fed token's event, sent once its routing is known
  std::vector<float> logits;
  RouterCapture routing;
  BatchResult result;

  Slot(BatchRequest r, const Tokenizer& tok)
      : req(std::move(r)), sampler(req.sampling), stop(req.stop_strings), decoder(tok) {}
};

namespace {

// log-softmax of one row at `id`, with the k most likely tokens.
TokenLogprob token_logprob(const float* logits, int64_t V, int32_t id, int k) {
  float mx = logits[0];
  for (int64_t i = 1; i < V; i++) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < V; i++) sum += std::exp(double(logits[i]) - double(mx));
  const double lse = double(mx) + std::log(sum);
  TokenLogprob out;
  out.id = id;
  out.logprob = float(double(logits[id]) - lse);
  if (k > 0) {
    std::vector<int32_t> order(static_cast<size_t>(V));
    for (int64_t i = 0; i < V; i++) order[size_t(i)] = int32_t(i);
    const size_t n = std::min(size_t(k), order.size());
    std::partial_sort(order.begin(), order.begin() + ptrdiff_t(n), order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (size_t i = 0; i < n; i++) out.top.push_back({order[i], float(double(logits[order[i]]) - lse)});
  }
  return out;
}

}  // namespace

BatchScheduler::BatchScheduler(const Model& model, const Tokenizer& tok, int parallel, int64_t context,
                               int64_t max_queue)
    : model_(model), tok_(tok), parallel_(parallel), context_(context), max_queue_(max_queue) {
  if (parallel < 1 || parallel > 1024) fail("scheduler: parallel must be in [1, 1024], got ", parallel);
  if (context < 2 || context > model.config().max_position_embeddings)
    fail("scheduler: context must be in [2, max_position_embeddings = ", model.config().max_position_embeddings,
         "], got ", context);
  if (max_queue < 0) fail("scheduler: max_queue must be >= 0, got ", max_queue);
  stats_.parallel = parallel;
  thread_ = std::thread([this] { loop(); });
}

BatchScheduler::~BatchScheduler() { drain(); }

bool BatchScheduler::queue_full() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int64_t(queue_.size()) >= max_queue_;
}

uint64_t BatchScheduler::submit(BatchRequest req) {
  if (req.prompt.empty()) fail("the prompt has no tokens");
  const int64_t V = model_.config().vocab_size;
  for (size_t t = 0; t < req.prompt.size(); t++) {
    const int32_t id = req.prompt[t];
    const bool embedded = req.embeds && t + 1 < req.prompt.size();  // positions given by their embeddings
    if (!embedded && (id < 0 || id >= V)) fail("prompt token id ", id, " is outside the vocabulary [0, ", V, ")");
  }
  if (req.embeds && req.embeds->size() != req.prompt.size() * size_t(model_.config().hidden_size))
    fail("the prompt's embeddings hold ", req.embeds->size(), " values; ", req.prompt.size(), " positions x ",
         model_.config().hidden_size, " expected");
  if (req.embeds && req.prompt_logprobs) fail("prompt logprobs of a prompt given as embeddings are not supported");
  if (int64_t(req.prompt.size()) >= context_)
    fail("the prompt has ", req.prompt.size(), " tokens; the context holds ", context_,
         " positions (prompt + generated tokens, at least one generated)");
  if (req.max_tokens < 0) fail("max_tokens must be >= 0, got ", req.max_tokens);
  if (req.logprobs > 1000) fail("logprobs must be <= 1000, got ", req.logprobs);
  if (req.mask && req.mask->experts != model_.config().moe_experts)
    fail("the mask was built for ", req.mask->experts, " experts per side; the model has ",
         model_.config().moe_experts);
  auto slot = std::make_unique<Slot>(std::move(req), tok_);  // validates sampling and stop strings
  slot->max_tokens = std::min<int64_t>(slot->req.max_tokens, context_ - int64_t(slot->req.prompt.size()));
  slot->feed = slot->req.prompt;
  slot->history = slot->req.prompt;
  slot->result.prompt_tokens = int64_t(slot->req.prompt.size());
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) fail("the server is shutting down");
  if (int64_t(queue_.size()) >= max_queue_) fail("the queue is full (", max_queue_, " requests waiting)");
  slot->id = next_id_++;
  const uint64_t id = slot->id;
  queue_.push_back(std::move(slot));
  stats_.requests++;
  cv_.notify_all();
  return id;
}

void BatchScheduler::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancel_requests_.push_back(id);
  cv_.notify_all();
}

void BatchScheduler::drain() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

SchedulerStats BatchScheduler::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = stats_;
  s.queued = int64_t(queue_.size());
  s.active = active_count_;
  return s;
}

void BatchScheduler::finish(Slot& s, const std::string& reason, const std::string& error) {
  BatchResult& r = s.result;
  r.finish_reason = reason;
  r.error = error;
  r.generated_tokens = s.generated;
  if (reason == "stop" || reason == "length") {
    // Release what the decoder and the stop strings held back.
    if (!s.stop.stopped()) {
      r.tail = s.stop.feed(s.decoder.flush());
      if (!s.stop.stopped()) r.tail += s.stop.flush();
      else r.finish_reason = "stop";
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.finished++;
    if (reason == "cancelled") stats_.cancelled++;
    if (reason == "error") stats_.errors++;
  }
  s.done = true;
  if (s.req.on_done) s.req.on_done(r);
}

void BatchScheduler::loop() {
  std::vector<std::unique_ptr<Slot>> active;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active.empty(); });
      // Cancellations: queued requests leave now, active ones below.
      for (uint64_t id : cancel_requests_) {
        for (auto it = queue_.begin(); it != queue_.end(); ++it)
          if ((*it)->id == id) {
            std::unique_ptr<Slot> s = std::move(*it);
            queue_.erase(it);
            lock.unlock();
            finish(*s, "cancelled");
            lock.lock();
            break;
          }
        for (auto& s : active)
          if (s->id == id) s->cancel_requested = true;
      }
      cancel_requests_.clear();
      while (int(active.size()) < parallel_ && !queue_.empty()) {
        active.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      active_count_ = int64_t(active.size());
      if (active.empty()) {
        if (stopping_ && queue_.empty()) return;
        continue;
      }
    }
    for (auto& s : active)
      if (s->cancel_requested) finish(*s, "cancelled");
    std::erase_if(active, [](const std::unique_ptr<Slot>& s) { return s->done; });
    if (!active.empty()) step(active);
    std::erase_if(active, [](const std::unique_ptr<Slot>& s) { return s->done; });
    std::lock_guard<std::mutex> lock(mu_);
    active_count_ = int64_t(active.size());
  }
}

void BatchScheduler::step(std::vector<std::unique_ptr<Slot>>& active) {
  const int64_t V = model_.config().vocab_size;
  std::vector<Sequence> seqs(active.size());
  for (size_t k = 0; k < active.size(); k++) {
    Slot& s = *active[k];
    if (s.cache.capacity == 0) s.cache = model_.new_cache(int64_t(s.req.prompt.size()) + s.max_tokens + 1);
    Sequence& q = seqs[k];
    q.cache = &s.cache;
    q.ids = s.feed.data();
    q.n = int64_t(s.feed.size());
    if (!s.prefilled && s.req.embeds) q.embeds = s.req.embeds->data();
    q.logits = s.finishing ? Logits::None : (!s.prefilled && s.req.prompt_logprobs) ? Logits::All : Logits::Last;
    q.logits_out = &s.logits;
    s.routing = RouterCapture();
    q.routing = s.req.routing && s.prefilled ? &s.routing : nullptr;
    q.mask = s.req.mask.get();
  }
  const auto t0 = std::chrono::steady_clock::now();
  try {
    model_.forward_batch(seqs);
  } catch (const std::exception& e) {
    for (auto& s : active) finish(*s, "error", e.what());
    return;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int64_t prompt_tokens = 0, generated_tokens = 0;

  for (auto& sp : active) {
    Slot& s = *sp;
    auto emit = [&](const TokenEvent& ev) { return !s.req.on_token || s.req.on_token(ev); };
    if (s.prefilled && s.req.routing) {
      // The fed token's routing completes its event.
      s.held.g1.clear();
      s.held.g2.clear();
      for (size_t r = 0; r < s.routing.g1.size(); r++) {
        s.held.g1.push_back(s.routing.g1[r]);
        s.held.g2.push_back(s.routing.g2[r]);
      }
      if (!emit(s.held)) {
        finish(s, "cancelled");
        continue;
      }
    }
    if (!s.prefilled) {
      s.prefilled = true;
      prompt_tokens += int64_t(s.feed.size());
      if (s.req.prompt_logprobs) {
        const std::vector<int32_t>& p = s.req.prompt;
        for (size_t t = 1; t < p.size(); t++)
          s.result.prompt_logprobs.push_back(token_logprob(s.logits.data() + (t - 1) * size_t(V), V, p[t],
                                                           std::max(s.req.logprobs, 0)));
        // Only the last row samples.
        s.logits.erase(s.logits.begin(), s.logits.end() - V);
      }
    }
    if (s.finishing) {
      finish(s, s.pending_reason);
      continue;
    }
    if (s.generated >= s.max_tokens) {
      finish(s, "length");
      continue;
    }
    int32_t id;
    try {
      id = s.sampler.sample(s.logits.data(), V, s.history);
    } catch (const std::exception& e) {
      finish(s, "error", e.what());
      continue;
    }
    if (std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), id) != s.req.stop_ids.end()) {
      finish(s, "stop");
      continue;
    }
    TokenEvent ev;
    ev.id = id;
    if (s.req.logprobs >= 0) ev.logprob = token_logprob(s.logits.data(), V, id, s.req.logprobs);
    s.generated++;
    generated_tokens++;
    s.history.push_back(id);
    ev.text = s.stop.feed(s.decoder.feed(id));
    const bool at_end = s.stop.stopped() || s.generated >= s.max_tokens;
    s.feed.assign(1, id);
    if (s.req.routing) {
      // Sent after the next step, which feeds this token and routes it.
      s.held = std::move(ev);
      if (at_end) {
        s.finishing = true;
        s.pending_reason = s.stop.stopped() ? "stop" : "length";
      }
      continue;
    }
    if (!emit(ev)) {
      finish(s, "cancelled");
      continue;
    }
    if (at_end) finish(s, s.stop.stopped() ? "stop" : "length");
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.steps++;
  stats_.busy_seconds += seconds;
  stats_.prompt_tokens += prompt_tokens;
  stats_.generated_tokens += generated_tokens;
}

}  // namespace monet
