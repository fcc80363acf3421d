#include "monet/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <unordered_set>
#include <utility>

#include "monet/error.h"

namespace monet {

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  if (!(p.temperature >= 0)) fail("sampling: temperature must be >= 0, got ", p.temperature);
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("sampling: top_p must be in (0, 1], got ", p.top_p);
  if (!(p.min_p >= 0 && p.min_p < 1)) fail("sampling: min_p must be in [0, 1), got ", p.min_p);
  if (!(p.repeat_penalty > 0) || !std::isfinite(p.repeat_penalty))
    fail("sampling: repeat_penalty must be a finite number > 0, got ", p.repeat_penalty);
  if (p.top_k < 0) fail("sampling: top_k must be >= 0, got ", p.top_k);
  if (p.repeat_last_n < -1) fail("sampling: repeat_last_n must be -1 (all) or >= 0, got ", p.repeat_last_n);
}

int32_t Sampler::sample(const float* logits, int64_t vocab, const std::vector<int32_t>& history) {
  cand_.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; i++) {
    if (!std::isfinite(logits[i]))
      fail("the model produced a non-finite logit (", logits[i], " for token ", i,
           "): its weights or the input are broken; nothing is sampled from it");
    cand_[size_t(i)] = {logits[i], int32_t(i)};
  }
  if (p_.repeat_penalty != 1.0f) {
    const size_t n = p_.repeat_last_n < 0 ? history.size() : std::min(history.size(), size_t(p_.repeat_last_n));
    std::unordered_set<int32_t> seen(history.end() - ptrdiff_t(n), history.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= vocab) continue;
      float& l = cand_[size_t(id)].first;
      l = l > 0 ? l / p_.repeat_penalty : l * p_.repeat_penalty;
    }
  }
  if (p_.temperature == 0.0f) {
    // Greedy: first maximum, as torch.argmax.
    size_t best = 0;
    for (size_t i = 1; i < cand_.size(); i++)
      if (cand_[i].first > cand_[best].first) best = i;
    return cand_[best].second;
  }
  for (auto& c : cand_) c.first /= p_.temperature;
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = cand_.size();
  if (p_.top_k > 0 && size_t(p_.top_k) < keep) {
    keep = size_t(p_.top_k);
    std::partial_sort(cand_.begin(), cand_.begin() + ptrdiff_t(keep), cand_.end(), by_logit);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  cand_.resize(keep);
  // softmax over the candidates (sorted, so the max is first)
  std::vector<double> prob(cand_.size());
  double sum = 0;
  for (size_t i = 0; i < cand_.size(); i++) sum += prob[i] = std::exp(double(cand_[i].first - cand_[0].first));
  for (double& p : prob) p /= sum;
  if (p_.top_p < 1.0f) {
    double cum = 0;
    size_t n = 0;
    while (n < prob.size()) {
      cum += prob[n++];
      if (cum >= p_.top_p) break;
    }
    prob.resize(n);
  }
  if (p_.min_p > 0.0f) {
    const double floor = p_.min_p * prob[0];
    size_t n = 1;
    while (n < prob.size() && prob[n] >= floor) n++;
    prob.resize(n);
  }
  double total = 0;
  for (double p : prob) total += p;
  const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double cum = 0;
  for (size_t i = 0; i < prob.size(); i++) {
    cum += prob[i];
    if (r < cum) return cand_[i].second;
  }
  return cand_[prob.size() - 1].second;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_)
    if (s.empty()) fail("a stop string cannot be empty");
}

std::string StopMatcher::feed(const std::string& text) {
  if (stopped_) return "";
  pending_ += text;
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, pending_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  // Keep the longest suffix that is a prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, pending_.size()); n > keep; n--)
      if (pending_.compare(pending_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StopMatcher::flush() { return std::exchange(pending_, ""); }

std::vector<int32_t> generate(const Model& model, KvCache& cache, const std::vector<int32_t>& prompt,
                              const GenerateOptions& opts, const std::function<bool(int32_t)>& on_token,
                              GenerateStats* stats) {
  using clock = std::chrono::steady_clock;
  const int64_t V = model.config().vocab_size;
  Sampler sampler(opts.sampling);  // validates the sampling options first
  if (prompt.empty()) fail("generate: the prompt has no tokens");
  if (opts.max_tokens < 0) fail("generate: max_tokens must be >= 0, got ", opts.max_tokens);
  const int64_t context = model.config().max_position_embeddings;
  if (cache.length + int64_t(prompt.size()) > context)
    fail("generate: ", cache.length, " cached + ", prompt.size(), " prompt tokens exceed max_position_embeddings = ",
         context);
  // Generation stops where the context ends.
  const int64_t max_tokens = std::min(opts.max_tokens, context - cache.length - int64_t(prompt.size()));
  std::vector<int32_t> history = prompt, out;
  std::vector<float> logits;
  ForwardOptions fo;
  fo.all_logits = false;
  fo.mask = opts.mask;
  auto t0 = clock::now();
  model.forward(cache, prompt.data(), int64_t(prompt.size()), logits, fo);
  auto t1 = clock::now();
  for (int64_t step = 0; step < max_tokens; step++) {
    const int32_t id = sampler.sample(logits.data(), V, history);
    if (std::find(opts.stop_ids.begin(), opts.stop_ids.end(), id) != opts.stop_ids.end()) break;
    out.push_back(id);
    history.push_back(id);
    if (!on_token(id)) break;
    if (step + 1 < max_tokens) model.forward(cache, &id, 1, logits, fo);
  }
  auto t2 = clock::now();
  if (stats) {
    stats->prompt_tokens = int64_t(prompt.size());
    stats->generated_tokens = int64_t(out.size());
    stats->prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    stats->generate_seconds = std::chrono::duration<double>(t2 - t1).count();
    stats->hit_context_end = max_tokens < opts.max_tokens && int64_t(out.size()) == max_tokens;
  }
  return out;
}

GenerateResult generate_text(const Model& model, const Tokenizer& tok, KvCache& cache,
                             const std::vector<int32_t>& prompt, const GenerateOptions& opts,
                             const std::function<bool(const std::string&)>& on_text) {
  StopMatcher stop(opts.stop_strings);
  StreamDecoder stream(tok);
  GenerateResult r;
  bool cancelled = false;
  auto emit = [&](const std::string& piece) {
    if (piece.empty()) return true;
    r.text += piece;
    return !on_text || on_text(piece);
  };
  r.ids = generate(model, cache, prompt, opts, [&](int32_t id) {
    const std::string piece = stop.feed(stream.feed(id));
    if (!emit(piece)) cancelled = true;
    return !cancelled && !stop.stopped();
  }, &r.stats);
  if (!stop.stopped() && !cancelled) {
    std::string rest = stop.feed(stream.flush());
    if (!stop.stopped()) rest += stop.flush();
    if (!emit(rest)) cancelled = true;
  }
  const bool hit_length = int64_t(r.ids.size()) >= opts.max_tokens || r.stats.hit_context_end;
  r.finish_reason = cancelled ? "cancelled" : stop.stopped() ? "stop" : hit_length ? "length" : "stop";
  return r;
}

std::vector<int32_t> chat_stop_ids(const MonetConfig& c, const Tokenizer& tok, ChatFormat format) {
  std::vector<int32_t> ids(c.eos_token_ids.begin(), c.eos_token_ids.end());
  if (tok.eos_id() >= 0) ids.push_back(tok.eos_id());
  if (format == ChatFormat::ChatML) {
    const int32_t im_end = tok.token_id("<|im_end|>");
    if (im_end >= 0) ids.push_back(im_end);
  }
  return ids;
}

std::string render_chat_prompt(const Tokenizer& tok, ChatFormat format, const std::vector<ChatMessage>& messages,
                               bool add_generation_prompt) {
  const std::string bos = tok.bos_id() >= 0 ? tok.piece(tok.bos_id()) : "";
  const std::string eos = tok.eos_id() >= 0 ? tok.piece(tok.eos_id()) : "";
  return render_chat(format, messages, add_generation_prompt, bos, eos);
}

ChatSession::ChatSession(const Model& model, const Tokenizer& tok, ChatFormat format, std::vector<ChatMessage> messages)
    : model_(model), tok_(tok), format_(format), messages_(std::move(messages)), cache_(model.new_cache(256)) {}

GenerateResult ChatSession::reply(const std::string& user_text, const GenerateOptions& opts,
                                  const std::function<bool(const std::string&)>& on_text, int64_t* prompt_reused) {
  std::vector<ChatMessage> msgs = messages_;
  msgs.push_back({"user", user_text});
  const std::vector<int32_t> ids = tok_.encode(render_chat_prompt(tok_, format_, msgs, true), false);
  // Reuse the cache for the longest common prefix; feed only the rest.
  size_t common = 0;
  while (common < cached_.size() && common < ids.size() && cached_[common] == ids[common]) common++;
  if (common == ids.size()) common--;  // at least one token must be fed to get logits
  cache_.length = int64_t(common);
  const std::vector<int32_t> fresh(ids.begin() + ptrdiff_t(common), ids.end());
  GenerateOptions go = opts;
  if (go.stop_ids.empty()) go.stop_ids = chat_stop_ids(model_.config(), tok_, format_);
  GenerateResult r = generate_text(model_, tok_, cache_, fresh, go, on_text);
  if (prompt_reused) *prompt_reused = int64_t(common);
  cached_ = ids;
  cached_.insert(cached_.end(), r.ids.begin(), r.ids.end());
  cached_.resize(size_t(cache_.length));
  msgs.push_back({"assistant", r.text});
  messages_ = std::move(msgs);
  return r;
}

}  // namespace monet
