// config.json: parse_config and what is computed from an accepted config
// (parameter count, memory estimate, router sigma); config_to_json of it
// must parse back to the same config.
#include <cmath>

#include "fuzz_util.h"
#include "monet/config.h"
#include "monet/error.h"
#include "monet/memory.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  monet::MonetConfig c;
  try {
    c = monet::parse_config(text, "config.json");
  } catch (const monet::Error&) {
    return 0;
  }
  // an accepted config is within the limits and consistent
  FUZZ_CHECK(monet::config_parameter_count(c) <= uint64_t(monet::ConfigLimits::parameters));
  FUZZ_CHECK(c.head_dim() > 0 && c.head_dim() % 2 == 0 && c.num_router_layers() > 0);
  for (monet::DType dt : {monet::DType::F32, monet::DType::BF16, monet::DType::F16})
    (void)monet::estimate_load_memory(c, dt, c.max_position_embeddings).total();
  const double sigma = c.router_sigma();
  FUZZ_CHECK(std::isfinite(sigma));
  // written and read again: the same config
  monet::MonetConfig back;
  try {
    back = monet::parse_config(monet::config_to_json(c), "round-trip");
  } catch (const monet::Error& e) {
    std::fprintf(stderr, "config_to_json output refused: %s\n", e.what());
    FUZZ_CHECK(false);
  }
  FUZZ_CHECK(back.vocab_size == c.vocab_size && back.hidden_size == c.hidden_size &&
             back.num_hidden_layers == c.num_hidden_layers && back.num_attention_heads == c.num_attention_heads &&
             back.num_key_value_heads == c.num_key_value_heads &&
             back.max_position_embeddings == c.max_position_embeddings && back.moe_dim == c.moe_dim &&
             back.moe_heads == c.moe_heads && back.moe_experts == c.moe_experts && back.moe_topk == c.moe_topk &&
             back.moe_groups == c.moe_groups && back.moe_decompose == c.moe_decompose &&
             back.tie_word_embeddings == c.tie_word_embeddings && back.bos_token_id == c.bos_token_id &&
             back.eos_token_ids == c.eos_token_ids && back.pad_token_id == c.pad_token_id &&
             back.rms_norm_eps == c.rms_norm_eps && back.rope_theta == c.rope_theta);
  return 0;
}
