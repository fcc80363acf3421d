// The Monet decoder forward pass on the CPU (shared/monet-spec.md).
#include <algorithm>
#include <cstring>

#include "backend/cpu/ops.h"
#include "model/experts.h"
#include "monet/error.h"
#include "monet/model.h"

namespace monet {
namespace {

void ensure_capacity(const MonetConfig& c, KvCache& cache, int64_t needed) {
  if (needed <= cache.capacity) return;
  const int64_t cap = std::max(needed, cache.capacity * 2);
  const size_t row = size_t(c.num_key_value_heads * c.head_dim());
  cache.k.resize(size_t(c.num_hidden_layers));
  cache.v.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    cache.k[size_t(l)].resize(size_t(cap) * row);
    cache.v[size_t(l)].resize(size_t(cap) * row);
  }
  cache.capacity = cap;
}

// Scratch activations of one forward call, named after the spec's symbols.
struct Activations {
  std::vector<float> x;      // [T, d] residual stream
  std::vector<float> xn;     // [T, d] normed input of attention / experts
  std::vector<float> q, k, v;  // [T, nh*hd], [T, nkv*hd]
  std::vector<float> attn;   // [T, nh*hd]
  std::vector<float> proj;   // [T, d] o_proj / expert output
  std::vector<float> z;      // [T, H*E] router logits
  std::vector<float> g1, g2; // [T, H, E] router probabilities of the current group
  std::vector<float> rope_cos, rope_sin;  // [T, hd/2] rotary angles of this call's positions
};

// g = select(w y): the router of one layer group.
void router_forward(const MonetConfig& c, const RouterWeights& r, const float* y, int64_t T,
                    Activations& a) {
  const int64_t H = c.moe_heads, E = c.moe_experts;
  const double sigma = c.router_sigma();
  a.z.resize(size_t(T * H * E));
  a.g1.resize(size_t(T * H * E));
  a.g2.resize(size_t(T * H * E));
  cpu::linear(r.w1, y, T, a.z.data());
  cpu::router_select(a.z.data(), r.mean1.data(), r.var1.data(), T, H, E, sigma, a.g1.data());
  cpu::linear(r.w2, y, T, a.z.data());
  cpu::router_select(a.z.data(), r.mean2.data(), r.var2.data(), T, H, E, sigma, a.g2.data());
}

// One decoder layer on T tokens at positions pos0.., updating a.x in place.
void layer_forward(const MonetConfig& c, const LayerWeights& lw, int64_t l, KvCache& cache, int64_t pos0,
                   int64_t T, const ForwardOptions& opts, Activations& a) {
  const int64_t d = c.hidden_size, hd = c.head_dim(), nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int64_t kv_row = nkv * hd;
  // attention block: x += o_proj(attention(rmsnorm(x)))
  cpu::rmsnorm(a.x.data(), lw.input_norm.data(), T, d, c.rms_norm_eps, a.xn.data());
  cpu::linear(lw.wq, a.xn.data(), T, a.q.data());
  float* k_new = cache.k[size_t(l)].data() + pos0 * kv_row;
  float* v_new = cache.v[size_t(l)].data() + pos0 * kv_row;
  cpu::linear(lw.wk, a.xn.data(), T, k_new);
  cpu::linear(lw.wv, a.xn.data(), T, v_new);
  cpu::rope(a.q.data(), T, nh, hd, a.rope_cos.data(), a.rope_sin.data());
  cpu::rope(k_new, T, nkv, hd, a.rope_cos.data(), a.rope_sin.data());
  cpu::attention(a.q.data(), cache.k[size_t(l)].data(), cache.v[size_t(l)].data(), pos0, T, nh, nkv, hd,
                 a.attn.data());
  cpu::linear(lw.wo, a.attn.data(), T, a.proj.data());
  for (int64_t i = 0; i < T * d; i++) a.x[size_t(i)] += a.proj[size_t(i)];

  // expert block: x += experts(rmsnorm(x), g1, g2), the router shared by the group
  cpu::rmsnorm(a.x.data(), lw.post_norm.data(), T, d, c.rms_norm_eps, a.xn.data());
  if (lw.has_router) {
    router_forward(c, lw.router, a.xn.data(), T, a);
    if (opts.capture) {
      opts.capture->g1.push_back(a.g1);
      opts.capture->g2.push_back(a.g2);
    }
  }
  if (opts.routing_only && l >= (c.num_hidden_layers - 1) / c.moe_groups * c.moe_groups) return;  // last router done
  const bool dense = T >= opts.dense_expert_min_tokens;
  experts_forward(c, lw, a.xn.data(), a.g1.data(), a.g2.data(), T, dense, opts.mask, l / c.moe_groups,
                  a.proj.data());
  for (int64_t i = 0; i < T * d; i++) a.x[size_t(i)] += a.proj[size_t(i)];
}

}  // namespace

void Model::forward(KvCache& cache, const int32_t* ids, int64_t n, std::vector<float>& logits,
                    const ForwardOptions& opts) const {
  const MonetConfig& c = config_;
  const int64_t d = c.hidden_size, V = c.vocab_size;
  if (n <= 0) fail("forward: no tokens given");
  for (int64_t t = 0; t < n; t++)
    if (ids[t] < 0 || ids[t] >= V) fail("token id ", ids[t], " at position ", t, " is outside the vocabulary [0, ", V, ")");
  const int64_t pos0 = cache.length;
  ensure_capacity(c, cache, pos0 + n);

  Activations a;
  const int64_t T = n;
  a.x.resize(size_t(T * d));
  a.xn.resize(size_t(T * d));
  a.q.resize(size_t(T * c.num_attention_heads * c.head_dim()));
  a.attn.resize(a.q.size());
  a.proj.resize(size_t(T * d));
  for (int64_t t = 0; t < T; t++) cpu::widen(weights_.embed, int64_t(ids[t]) * d, d, a.x.data() + t * d);
  cpu::rope_table(T, c.head_dim(), pos0, c.rope_theta, a.rope_cos, a.rope_sin);

  // With routing_only, layers after the last router layer are not needed.
  const int64_t layers = opts.routing_only ? (c.num_hidden_layers - 1) / c.moe_groups * c.moe_groups + 1
                                           : c.num_hidden_layers;
  for (int64_t l = 0; l < layers; l++) layer_forward(c, weights_.layers[size_t(l)], l, cache, pos0, T, opts, a);
  if (opts.routing_only) {
    logits.clear();
    return;
  }
  cache.length = pos0 + n;

  // logits = lm_head(rmsnorm(x)) for every token, or the last one only
  const int64_t first = opts.all_logits ? 0 : T - 1;
  const int64_t rows = T - first;
  cpu::rmsnorm(a.x.data() + first * d, weights_.final_norm.data(), rows, d, c.rms_norm_eps, a.xn.data());
  logits.resize(size_t(rows * V));
  cpu::linear(weights_.lm_head, a.xn.data(), rows, logits.data());
}

}  // namespace monet
