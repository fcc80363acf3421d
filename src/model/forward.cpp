// The Monet decoder forward pass (docs/monet.md) over the backend interface,
// for a batch of independent sequences. Rows of every activation matrix are
// the batch's tokens, sequence after sequence; attention is the only op that
// sees the sequences apart (each reads its own cache).
#include <algorithm>
#include <cstring>
#include <set>

#include "backend/backend.h"
#include "core/monet_math.h"
#include "monet/error.h"
#include "monet/mask.h"
#include "monet/model.h"

namespace monet {
namespace {

// Where each sequence's tokens are among the batch's rows.
struct BatchLayout {
  std::vector<int64_t> row0;  // [seqs] first row
  std::vector<int64_t> pos0;  // [seqs] first position (the cache length before the call)
  int64_t rows = 0;
};

// Scratch activations of one forward call, named after docs/monet.md's symbols.
struct Activations {
  Buffer x;         // [T, d] residual stream
  Buffer xn;        // [T, d] normed input of attention / experts
  Buffer q, k, v;   // [T, nh*hd], [T, nkv*hd]
  Buffer attn;      // [T, nh*hd]
  Buffer proj;      // [T, d] o_proj / expert output
  Buffer z;         // [T, H*E] router logits
  Buffer g1, g2;    // [T, H, E] router probabilities of the current group
  Buffer rope_cos, rope_sin;  // [T, hd/2] rotary angles of each row's position
};

void ensure_capacity(Backend& be, const MonetConfig& c, KvCache& cache, int64_t needed) {
  if (needed <= cache.capacity) return;
  const int64_t cap = std::max(needed, cache.capacity * 2);
  const size_t row_bytes = size_t(c.num_key_value_heads * c.head_dim()) * sizeof(float);
  cache.k.resize(size_t(c.num_hidden_layers));
  cache.v.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; l++)
    for (Buffer* b : {&cache.k[size_t(l)], &cache.v[size_t(l)]}) {
      Buffer grown = be.alloc(size_t(cap) * row_bytes);
      if (*b) be.copy(grown.data(), b->data(), size_t(cache.length) * row_bytes);
      *b = std::move(grown);
    }
  cache.capacity = cap;
}

// Copies rows of a backend matrix [T, cols] belonging to each sequence to
// that sequence's host vector (appending).
void rows_to_host(Backend& be, const float* src, int64_t cols, int64_t row0, int64_t n, std::vector<float>& out) {
  const size_t at = out.size();
  out.resize(at + size_t(n * cols));
  be.to_host(out.data() + at, src + row0 * cols, size_t(n * cols) * sizeof(float));
}

// Checks the requested capture names against the model: "resid_pre.{l}" etc.
void check_capture_names(const MonetConfig& c, const ActivationCapture& cap) {
  for (const std::string& name : cap.names) {
    const size_t dot = name.find('.');
    const std::string kind = name.substr(0, dot);
    const bool known = kind == "resid_pre" || kind == "attn_out" || kind == "moe_out" || kind == "resid_post";
    int64_t l = -1;
    if (dot != std::string::npos && dot + 1 < name.size() && name.size() - dot <= 10 &&
        name.find_first_not_of("0123456789", dot + 1) == std::string::npos)
      l = std::stoll(name.substr(dot + 1));
    if (!known || l < 0 || l >= c.num_hidden_layers)
      fail("capture \"", name, "\": expected resid_pre.L, attn_out.L, moe_out.L or resid_post.L with L in [0, ",
           c.num_hidden_layers, ")");
  }
}

}  // namespace

void Model::forward_batch(std::vector<Sequence>& seqs, const BatchOptions& opts) const {
  const MonetConfig& c = config_;
  Backend& be = *backend_;
  const int64_t d = c.hidden_size, V = c.vocab_size, hd = c.head_dim();
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, kv_row = nkv * hd;
  const int64_t H = c.moe_heads, E = c.moe_experts;
  if (seqs.empty()) fail("forward: no sequences given");

  // Layout and checks.
  BatchLayout bl;
  std::set<const KvCache*> caches;
  for (size_t s = 0; s < seqs.size(); s++) {
    const Sequence& sq = seqs[s];
    if (!sq.cache) fail("forward: sequence ", s, " has no cache");
    if (!caches.insert(sq.cache).second) fail("forward: sequence ", s, " shares its cache with another sequence");
    if (sq.n <= 0) fail("forward: sequence ", s, " has no tokens");
    if (!sq.embeds) {
      if (!sq.ids) fail("forward: sequence ", s, " has neither token ids nor embeddings");
      for (int64_t t = 0; t < sq.n; t++)
        if (sq.ids[t] < 0 || sq.ids[t] >= V)
          fail("token id ", sq.ids[t], " at position ", t, " is outside the vocabulary [0, ", V, ")");
    }
    if (sq.logits != Logits::None && !sq.logits_out) fail("forward: sequence ", s, " wants logits but gives no output");
    if (sq.mask && sq.mask->experts != E)
      fail("forward: the mask of sequence ", s, " was built for ", sq.mask->experts, " experts per side, the model has ", E);
    if (sq.activations) check_capture_names(c, *sq.activations);
    bl.row0.push_back(bl.rows);
    bl.pos0.push_back(sq.cache->length);
    bl.rows += sq.n;
  }
  const int64_t T = bl.rows;
  for (Sequence& sq : seqs) ensure_capacity(be, c, *sq.cache, sq.cache->length + sq.n);

  Activations a;
  const size_t f = sizeof(float);
  a.x = be.alloc(size_t(T * d) * f);
  a.xn = be.alloc(size_t(T * d) * f);
  a.q = be.alloc(size_t(T * nh * hd) * f);
  a.k = be.alloc(size_t(T * kv_row) * f);
  a.v = be.alloc(size_t(T * kv_row) * f);
  a.attn = be.alloc(size_t(T * nh * hd) * f);
  a.proj = be.alloc(size_t(T * d) * f);
  a.z = be.alloc(size_t(T * H * E) * f);
  a.g1 = be.alloc(size_t(T * H * E) * f);
  a.g2 = be.alloc(size_t(T * H * E) * f);

  // Embeddings and the rotary angles of every row's position.
  {
    std::vector<float> cos_t(size_t(T * (hd / 2))), sin_t(cos_t.size());
    for (size_t s = 0; s < seqs.size(); s++) {
      const Sequence& sq = seqs[s];
      float* x = a.x.f32() + bl.row0[s] * d;
      if (sq.embeds) be.from_host(x, sq.embeds, size_t(sq.n * d) * f);
      else be.embed(weights_.embed, sq.ids, sq.n, x);
      rope_angles(bl.pos0[s], sq.n, hd, c.rope_theta, cos_t.data() + bl.row0[s] * (hd / 2),
                  sin_t.data() + bl.row0[s] * (hd / 2));
    }
    a.rope_cos = be.alloc(cos_t.size() * f);
    a.rope_sin = be.alloc(sin_t.size() * f);
    be.from_host(a.rope_cos.data(), cos_t.data(), cos_t.size() * f);
    be.from_host(a.rope_sin.data(), sin_t.data(), sin_t.size() * f);
  }

  // Per-row masks (the expert mix scales each token's experts by its sequence's mask).
  std::vector<const ExpertMask*> row_mask;
  for (size_t s = 0; s < seqs.size(); s++)
    if (seqs[s].mask) {
      row_mask.assign(size_t(T), nullptr);
      for (size_t s2 = 0; s2 < seqs.size(); s2++)
        std::fill_n(row_mask.begin() + bl.row0[s2], seqs[s2].n, seqs[s2].mask);
      break;
    }

  auto capture = [&](const char* kind, int64_t l, const float* m) {
    for (size_t s = 0; s < seqs.size(); s++) {
      ActivationCapture* cap = seqs[s].activations;
      if (!cap) continue;
      const std::string name = std::string(kind) + "." + std::to_string(l);
      if (std::find(cap->names.begin(), cap->names.end(), name) == cap->names.end()) continue;
      rows_to_host(be, m, d, bl.row0[s], seqs[s].n, cap->values[name]);
    }
  };

  const double sigma = c.router_sigma();
  const int64_t last_router = (c.num_hidden_layers - 1) / c.moe_groups * c.moe_groups;
  std::vector<AttentionSeq> attn_seqs(seqs.size());
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    const LayerWeights& lw = weights_.layers[size_t(l)];
    capture("resid_pre", l, a.x.f32());
    // attention block: x += o_proj(attention(rmsnorm(x)))
    be.rmsnorm(a.x.f32(), lw.input_norm, T, d, c.rms_norm_eps, a.xn.f32());
    be.linear(lw.wq, a.xn.f32(), T, a.q.f32());
    be.linear(lw.wk, a.xn.f32(), T, a.k.f32());
    be.linear(lw.wv, a.xn.f32(), T, a.v.f32());
    be.rope(a.q.f32(), T, nh, hd, a.rope_cos.f32(), a.rope_sin.f32());
    be.rope(a.k.f32(), T, nkv, hd, a.rope_cos.f32(), a.rope_sin.f32());
    for (size_t s = 0; s < seqs.size(); s++) {
      KvCache& cache = *seqs[s].cache;
      const size_t bytes = size_t(seqs[s].n * kv_row) * f;
      float* k_cache = cache.k[size_t(l)].f32();
      float* v_cache = cache.v[size_t(l)].f32();
      be.copy(k_cache + bl.pos0[s] * kv_row, a.k.f32() + bl.row0[s] * kv_row, bytes);
      be.copy(v_cache + bl.pos0[s] * kv_row, a.v.f32() + bl.row0[s] * kv_row, bytes);
      attn_seqs[s] = {bl.row0[s], seqs[s].n, bl.pos0[s], k_cache, v_cache};
    }
    be.attention(a.q.f32(), attn_seqs.data(), int64_t(attn_seqs.size()), nh, nkv, hd, /*causal=*/true, a.attn.f32(),
                 lw.wq.dtype);
    be.linear(lw.wo, a.attn.f32(), T, a.proj.f32());
    capture("attn_out", l, a.proj.f32());
    be.add(a.x.f32(), a.proj.f32(), T * d);

    // expert block: x += experts(rmsnorm(x), g1, g2), the router shared by the group
    be.rmsnorm(a.x.f32(), lw.post_norm, T, d, c.rms_norm_eps, a.xn.f32());
    if (lw.has_router) {
      const RouterWeights& r = lw.router;
      be.router(r.w1, a.xn.f32(), T, r.mean1, r.var1, H, E, sigma, a.z.f32(), a.g1.f32());
      be.router(r.w2, a.xn.f32(), T, r.mean2, r.var2, H, E, sigma, a.z.f32(), a.g2.f32());
      for (size_t s = 0; s < seqs.size(); s++) {
        RouterCapture* cap = seqs[s].routing;
        if (!cap) continue;
        cap->g1.emplace_back();
        cap->g2.emplace_back();
        rows_to_host(be, a.g1.f32(), H * E, bl.row0[s], seqs[s].n, cap->g1.back());
        rows_to_host(be, a.g2.f32(), H * E, bl.row0[s], seqs[s].n, cap->g2.back());
      }
    }
    if (opts.routing_only && l == last_router) return;  // the last router is done
    ExpertMixArgs mix;
    mix.config = &c;
    mix.weights = &lw.experts;
    mix.T = T;
    mix.y = a.xn.f32();
    mix.g1 = a.g1.f32();
    mix.g2 = a.g2.f32();
    mix.masks = row_mask.empty() ? nullptr : row_mask.data();
    mix.group = l / c.moe_groups;
    mix.same_routing = !lw.has_router && l > 0;  // the previous layer's mix saw these g1, g2
    mix.path = opts.expert_path;
    mix.out = a.proj.f32();
    be.expert_mix(mix);
    capture("moe_out", l, a.proj.f32());
    be.add(a.x.f32(), a.proj.f32(), T * d);
    capture("resid_post", l, a.x.f32());
  }
  for (Sequence& sq : seqs) sq.cache->length += sq.n;

  // logits = lm_head(rmsnorm(x)) for the rows each sequence wants.
  std::vector<int64_t> rows;
  for (size_t s = 0; s < seqs.size(); s++) {
    if (seqs[s].logits == Logits::All)
      for (int64_t t = 0; t < seqs[s].n; t++) rows.push_back(bl.row0[s] + t);
    else if (seqs[s].logits == Logits::Last)
      rows.push_back(bl.row0[s] + seqs[s].n - 1);
  }
  if (rows.empty()) return;
  const int64_t R = int64_t(rows.size());
  Buffer picked = be.alloc(size_t(R * d) * f), logits = be.alloc(size_t(R * V) * f);
  bool contiguous = true;
  for (int64_t i = 0; i < R; i++) contiguous &= rows[size_t(i)] == rows[0] + i;
  if (contiguous) be.copy(picked.data(), a.x.f32() + rows[0] * d, size_t(R * d) * f);
  else
    for (int64_t i = 0; i < R; i++) be.copy(picked.f32() + i * d, a.x.f32() + rows[size_t(i)] * d, size_t(d) * f);
  be.rmsnorm(picked.f32(), weights_.final_norm, R, d, c.rms_norm_eps, a.xn.f32());
  be.linear(weights_.lm_head, a.xn.f32(), R, logits.f32());
  int64_t at = 0;
  for (Sequence& sq : seqs) {
    if (sq.logits == Logits::None) continue;
    const int64_t n = sq.logits == Logits::All ? sq.n : 1;
    sq.logits_out->resize(size_t(n * V));
    be.to_host(sq.logits_out->data(), logits.f32() + at * V, size_t(n * V) * f);
    at += n;
  }
}

void Model::forward(KvCache& cache, const int32_t* ids, int64_t n, std::vector<float>& logits,
                    const ForwardOptions& opts) const {
  std::vector<Sequence> seqs(1);
  Sequence& s = seqs[0];
  s.cache = &cache;
  s.ids = ids;
  s.n = n;
  s.logits = opts.routing_only ? Logits::None : opts.all_logits ? Logits::All : Logits::Last;
  s.logits_out = &logits;
  s.routing = opts.capture;
  s.activations = opts.activations;
  s.mask = opts.mask;
  BatchOptions bo;
  bo.expert_path = opts.expert_path;
  bo.routing_only = opts.routing_only;
  if (opts.routing_only) logits.clear();
  forward_batch(seqs, bo);
}

void Model::embed_tokens(const int32_t* ids, int64_t n, float* out) const {
  for (int64_t t = 0; t < n; t++)
    if (ids[t] < 0 || ids[t] >= config_.vocab_size)
      fail("token id ", ids[t], " at position ", t, " is outside the vocabulary [0, ", config_.vocab_size, ")");
  const size_t bytes = size_t(n * config_.hidden_size) * sizeof(float);
  Buffer x = backend_->alloc(bytes);
  backend_->embed(weights_.embed, ids, n, x.f32());
  backend_->to_host(out, x.data(), bytes);
}

}  // namespace monet
