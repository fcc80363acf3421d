// config.json of a Monet checkpoint (HF MonetConfig, a LlamaConfig subclass).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace monet {

enum class Decompose { Vertical, Horizontal };

struct MonetConfig {
  // Defaults are those of HF MonetConfig.__init__.
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = -1;  // -1 in JSON/absent => num_attention_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  std::string hidden_act = "relu2";
  int64_t bos_token_id = 1;            // -1 when null
  std::vector<int64_t> eos_token_ids = {2};  // eos_token_id may be an int or a list
  int64_t pad_token_id = -1;
  std::string torch_dtype = "float32";
  int64_t moe_dim = 8;
  int64_t moe_heads = 8;
  int64_t moe_experts = 512;
  int64_t moe_topk = 32;
  int64_t moe_groups = 4;
  Decompose moe_decompose = Decompose::Vertical;
  // quantization_config {"quant_method": "monet_q8_0", "block_size": 32}:
  // the block size of the int8 weights (docs/quantization.md); 0 when the
  // checkpoint holds no quantized weights.
  int64_t quant_block = 0;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  bool has_router(int64_t layer) const { return layer % moe_groups == 0; }
  int64_t num_router_layers() const { return (num_hidden_layers + moe_groups - 1) / moe_groups; }
  // sigma = Phi^-1(1 - moe_topk / moe_experts), the router's selection threshold.
  double router_sigma() const;
  const char* decompose_name() const;
};

// Bounds of the fields (inclusive), generous beyond any released model, so
// that every size the model forms from them fits its integer types and no
// absurd value reaches an allocation. Memory for a valid config is checked
// against the machine at load (monet/memory.h).
struct ConfigLimits {
  static constexpr int64_t vocab_size = int64_t(1) << 24;    // token ids are int32; tokenizers stop at 2^24
  static constexpr int64_t hidden_size = int64_t(1) << 18;   // also bounds the attention heads
  static constexpr int64_t layers = int64_t(1) << 12;        // num_hidden_layers, moe_groups
  static constexpr int64_t positions = int64_t(1) << 24;     // max_position_embeddings
  static constexpr int64_t moe_dim = int64_t(1) << 16;
  static constexpr int64_t moe_heads = int64_t(1) << 12;
  static constexpr int64_t moe_experts = int64_t(1) << 16;   // E (E^2 experts per group), moe_topk
  static constexpr int64_t tensor_elements = int64_t(1) << 40;
  static constexpr int64_t parameters = int64_t(1) << 44;
};

// Checks every field against ConfigLimits and the others (divisibility,
// parity, topk < experts), and every size the model forms from them
// (embedding, router and expert matrices, total parameters) with
// overflow-safe arithmetic. Messages start with "<source>: " (none when
// empty) and name config.json's fields, or for a field listed in `names` its
// replacement (the trainer passes {"hidden_size": "--hidden", ...}).
void validate_config(const MonetConfig& c, const std::string& source,
                     const std::map<std::string, std::string>& names = {});

// Parameters (weights, not buffers) a config implies; saturates at UINT64_MAX.
uint64_t config_parameter_count(const MonetConfig& c);

// Parses and validates (validate_config); `source` names the file in error messages.
MonetConfig parse_config(const std::string& json_text, const std::string& source);
MonetConfig load_config(const std::string& path);  // reads the file, then parse_config
std::string config_to_json(const MonetConfig& c);  // HF-compatible config.json text

// Standard normal quantile (inverse CDF), accurate to ~1e-15.
double normal_quantile(double p);

}  // namespace monet
