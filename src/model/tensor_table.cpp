#include "model/tensor_table.h"

namespace monet {

std::string router_norm_name(int64_t layer, int side, const std::string& stat) {
  return "model.layers." + std::to_string(layer) + ".router.norm" + std::to_string(side) + "." + stat;
}

bool quantized_role(TensorRole role, bool tied_embeddings) {
  using R = TensorRole;
  switch (role) {
    case R::Wq: case R::Wk: case R::Wv: case R::Wo: case R::LmHead:
    case R::U1: case R::U2: case R::U: case R::V11: case R::V12: case R::V21: case R::V22: case R::V:
      return true;
    case R::Embed: return tied_embeddings;
    default: return false;
  }
}

int quant_axis(TensorRole role) {
  using R = TensorRole;
  return role == R::V11 || role == R::V12 || role == R::V21 || role == R::V22 || role == R::V ? 0 : 1;
}

std::string quant_scale_name(const std::string& name) { return name + "_scale"; }

std::vector<TensorSpec> tensor_table(const MonetConfig& c) {
  const int64_t d = c.hidden_size, hd = c.head_dim(), nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int64_t E = c.moe_experts, m = c.moe_dim, H = c.moe_heads, V = c.vocab_size;
  using R = TensorRole;
  using K = TensorKind;
  std::vector<TensorSpec> t;
  auto add = [&](R role, int64_t layer, std::string name, std::vector<int64_t> shape, K kind) {
    t.push_back({role, layer, std::move(name), std::move(shape), kind});
  };
  add(R::Embed, -1, "model.embed_tokens.weight", {V, d}, K::Matrix);
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(R::InputNorm, l, p + "input_layernorm.weight", {d}, K::Norm);
    add(R::Wq, l, p + "self_attn.q_proj.weight", {nh * hd, d}, K::Matrix);
    add(R::Wk, l, p + "self_attn.k_proj.weight", {nkv * hd, d}, K::Matrix);
    add(R::Wv, l, p + "self_attn.v_proj.weight", {nkv * hd, d}, K::Matrix);
    add(R::Wo, l, p + "self_attn.o_proj.weight", {d, nh * hd}, K::Matrix);
    add(R::PostNorm, l, p + "post_attention_layernorm.weight", {d}, K::Norm);
    if (c.has_router(l)) {
      add(R::RouterW1, l, p + "router.w1.weight", {H * E, d}, K::Matrix);
      add(R::RouterW2, l, p + "router.w2.weight", {H * E, d}, K::Matrix);
      add(R::RouterMean1, l, router_norm_name(l, 1, "running_mean"), {H}, K::RunningStat);
      add(R::RouterVar1, l, router_norm_name(l, 1, "running_var"), {H}, K::RunningStat);
      add(R::RouterMean2, l, router_norm_name(l, 2, "running_mean"), {H}, K::RunningStat);
      add(R::RouterVar2, l, router_norm_name(l, 2, "running_var"), {H}, K::RunningStat);
    }
    if (c.moe_decompose == Decompose::Vertical) {
      const int64_t half = E * m / 2;
      add(R::U1, l, p + "moe.u1.weight", {half, d}, K::Matrix);
      add(R::U1Bias, l, p + "moe.u1.bias", {half}, K::Bias);
      add(R::U2, l, p + "moe.u2.weight", {half, d}, K::Matrix);
      add(R::U2Bias, l, p + "moe.u2.bias", {half}, K::Bias);
      add(R::V11, l, p + "moe.v11.weight", {d / 2, half}, K::Matrix);
      add(R::V12, l, p + "moe.v12.weight", {d / 2, half}, K::Matrix);
      add(R::V21, l, p + "moe.v21.weight", {d / 2, half}, K::Matrix);
      add(R::V22, l, p + "moe.v22.weight", {d / 2, half}, K::Matrix);
      add(R::B1, l, p + "moe.b1", {E, d / 2}, K::Bias);
      add(R::B2, l, p + "moe.b2", {E, d / 2}, K::Bias);
    } else {
      add(R::U, l, p + "moe.u.weight", {E * m, d}, K::Matrix);
      add(R::UBias, l, p + "moe.u.bias", {E * m}, K::Bias);
      add(R::V, l, p + "moe.v.weight", {d, E * m}, K::Matrix);
      add(R::B, l, p + "moe.b", {E, d}, K::Bias);
    }
  }
  add(R::FinalNorm, -1, "model.norm.weight", {d}, K::Norm);
  if (!c.tie_word_embeddings) add(R::LmHead, -1, "lm_head.weight", {V, d}, K::Matrix);
  return t;
}

}  // namespace monet
