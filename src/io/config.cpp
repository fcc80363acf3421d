#include "monet/config.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <numbers>
#include <nlohmann/json.hpp>
#include <sstream>
#include <type_traits>

#include "monet/error.h"
#include "monet/safetensors.h"
#include "core/checked.h"

namespace monet {

using json = nlohmann::json;

namespace {

// A field of the config, or `fallback` when absent or null; a value of the
// wrong JSON type is an error naming the field.
template <class T>
T get_field(const json& j, const char* key, T fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  bool ok;
  const char* expected;
  if constexpr (std::is_same_v<T, bool>) {
    ok = v.is_boolean(), expected = "true or false";
  } else if constexpr (std::is_integral_v<T>) {
    ok = v.is_number_integer(), expected = "an integer";
  } else if constexpr (std::is_floating_point_v<T>) {
    ok = v.is_number(), expected = "a number";
  } else {
    ok = v.is_string(), expected = "a string";
  }
  if (!ok) fail(src, ": field \"", key, "\" must be ", expected, ", found ", v.dump());
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>)
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<T>::max()))
      fail(src, ": field \"", key, "\" = ", v.dump(), " is too large");  // get<T> would wrap it
  return v.get<T>();
}

}  // namespace

double MonetConfig::router_sigma() const {
  return normal_quantile(1.0 - double(moe_topk) / double(moe_experts));
}

const char* MonetConfig::decompose_name() const {
  return moe_decompose == Decompose::Vertical ? "vertical" : "horizontal";
}

MonetConfig parse_config(const std::string& json_text, const std::string& src) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail(src, ": not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail(src, ": must be a JSON object");
  MonetConfig c;
  c.vocab_size = get_field<int64_t>(j, "vocab_size", c.vocab_size, src);
  c.hidden_size = get_field<int64_t>(j, "hidden_size", c.hidden_size, src);
  c.num_hidden_layers = get_field<int64_t>(j, "num_hidden_layers", c.num_hidden_layers, src);
  c.num_attention_heads = get_field<int64_t>(j, "num_attention_heads", c.num_attention_heads, src);
  c.num_key_value_heads = get_field<int64_t>(j, "num_key_value_heads", c.num_attention_heads, src);
  c.max_position_embeddings = get_field<int64_t>(j, "max_position_embeddings", c.max_position_embeddings, src);
  c.rms_norm_eps = get_field<double>(j, "rms_norm_eps", c.rms_norm_eps, src);
  c.rope_theta = get_field<double>(j, "rope_theta", c.rope_theta, src);
  c.tie_word_embeddings = get_field<bool>(j, "tie_word_embeddings", c.tie_word_embeddings, src);
  c.hidden_act = get_field<std::string>(j, "hidden_act", c.hidden_act, src);
  // bos_token_id: absent -> HF default 1; null -> none (-1)
  c.bos_token_id = !j.contains("bos_token_id") ? 1 : get_field<int64_t>(j, "bos_token_id", -1, src);
  if (j.contains("eos_token_id")) {
    const json& e = j["eos_token_id"];
    c.eos_token_ids.clear();
    // ids beyond int64 are refused here (get<int64_t> would wrap them to -1, "none")
    auto eos_id = [&](const json& v) {
      if (!v.is_number_integer()) fail(src, ": field \"eos_token_id\" must be an integer or a list of integers");
      if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
        fail(src, ": field \"eos_token_id\" = ", v.dump(), " is too large");
      return v.get<int64_t>();
    };
    if (e.is_number_integer()) {
      c.eos_token_ids.push_back(eos_id(e));
    } else if (e.is_array()) {
      for (const json& v : e) c.eos_token_ids.push_back(eos_id(v));
    } else if (!e.is_null()) {
      fail(src, ": field \"eos_token_id\" must be an integer or a list of integers, found ", e.dump());
    }
  }
  c.pad_token_id = get_field<int64_t>(j, "pad_token_id", -1, src);
  // transformers >= 4.56 writes "dtype" in place of "torch_dtype".
  c.torch_dtype = get_field<std::string>(j, "torch_dtype", get_field<std::string>(j, "dtype", c.torch_dtype, src), src);
  c.moe_dim = get_field<int64_t>(j, "moe_dim", c.moe_dim, src);
  c.moe_heads = get_field<int64_t>(j, "moe_heads", c.moe_heads, src);
  c.moe_experts = get_field<int64_t>(j, "moe_experts", c.moe_experts, src);
  c.moe_topk = get_field<int64_t>(j, "moe_topk", c.moe_topk, src);
  c.moe_groups = get_field<int64_t>(j, "moe_groups", c.moe_groups, src);
  const std::string decompose = get_field<std::string>(j, "moe_decompose", "vertical", src);
  if (decompose == "vertical")
    c.moe_decompose = Decompose::Vertical;
  else if (decompose == "horizontal")
    c.moe_decompose = Decompose::Horizontal;
  else
    fail(src, ": field \"moe_decompose\" is \"", decompose, "\"; accepted values are \"vertical\" and \"horizontal\"");

  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    fail(src, ": field \"rope_scaling\" = ", j["rope_scaling"].dump(),
         " is not supported (released Monet models use null)");
  // transformers v5 moves rope_theta into rope_parameters; only plain RoPE is supported.
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    const json& rp = j["rope_parameters"];
    if (!rp.is_object()) fail(src, ": field \"rope_parameters\" must be an object, found ", rp.dump());
    const std::string type = get_field<std::string>(rp, "rope_type", get_field<std::string>(rp, "type", "default", src), src);
    if (type != "default")
      fail(src, ": field \"rope_parameters\" = ", rp.dump(), " is not supported (only rope_type \"default\")");
    c.rope_theta = get_field<double>(rp, "rope_theta", c.rope_theta, src);
  }
  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    // Only our own block int8 format (docs/quantization.md); other methods' tensors would not load.
    const json& q = j["quantization_config"];
    if (!q.is_object()) fail(src, ": field \"quantization_config\" must be an object, found ", q.dump());
    const std::string method = get_field<std::string>(q, "quant_method", "", src);
    if (method != "monet_q8_0")
      fail(src, ": quantization_config.quant_method is \"", method,
           "\"; only \"monet_q8_0\" (written by monet quantize) is supported");
    c.quant_block = get_field<int64_t>(q, "block_size", 0, src);
    if (c.quant_block != 32)
      fail(src, ": quantization_config.block_size is ", c.quant_block, ", expected 32 (monet_q8_0)");
    const std::string scale = get_field<std::string>(q, "scale_dtype", "F16", src);
    if (scale != "F16") fail(src, ": quantization_config.scale_dtype is \"", scale, "\", expected \"F16\"");
  }
  if (get_field<bool>(j, "attention_bias", false, src))
    fail(src, ": field \"attention_bias\" = true is not supported (Monet attention has no biases)");
  if (c.hidden_act != "relu2")
    fail(src, ": field \"hidden_act\" is \"", c.hidden_act, "\"; Monet experts use \"relu2\" (relu(x)^2)");

  // head_dim exists only in the JSON: checked against d / nh once those are valid.
  validate_config(c, src);
  // Llama configs may carry head_dim; Monet's attention assumes d / nh.
  if (const int64_t hd = get_field<int64_t>(j, "head_dim", c.head_dim(), src); hd != c.head_dim())
    fail(src, ": field \"head_dim\" is ", hd, " but hidden_size / num_attention_heads = ", c.head_dim(),
         "; a separate head_dim is not supported");
  return c;
}

uint64_t config_parameter_count(const MonetConfig& c) {
  const int64_t d = c.hidden_size, V = c.vocab_size, H = c.moe_heads, E = c.moe_experts, m = c.moe_dim;
  const int64_t hd = d / std::max<int64_t>(1, c.num_attention_heads), nkv = c.num_key_value_heads;
  // attention q, o [d, d], k, v [nkv*hd, d]; two norms
  const uint64_t attention = sat_add(sat_product({2, d, d}), sat_product({2, nkv, hd, d}));
  const uint64_t norms = sat_product({2, d});
  // router w1, w2 [H*E, d] (BatchNorm buffers are not parameters)
  const uint64_t router = sat_product({2, H, E, d});
  // experts: VD u1, u2 [E*m/2, d] + biases, v11..v22 [d/2, E*m/2], b1, b2 [E, d/2];
  // HD u [E*m, d] + bias, v [d, E*m], b [E, d]: the same totals.
  const uint64_t experts = sat_add(sat_add(sat_product({2, E, m, d}), sat_product({E, m})), sat_product({E, d}));
  uint64_t total = sat_product({V, d, c.tie_word_embeddings ? 1 : 2});
  total = sat_add(total, uint64_t(std::max<int64_t>(0, d)));  // final norm
  const uint64_t per_layer = sat_add(sat_add(attention, norms), experts);
  total = sat_add(total, sat_mul(per_layer, uint64_t(std::max<int64_t>(0, c.num_hidden_layers))));
  const int64_t routers = c.moe_groups > 0 ? (std::max<int64_t>(0, c.num_hidden_layers) + c.moe_groups - 1) / c.moe_groups : 0;
  return sat_add(total, sat_mul(router, uint64_t(routers)));
}

void validate_config(const MonetConfig& c, const std::string& src, const std::map<std::string, std::string>& names) {
  // A field as messages name it: config.json's name, or the option that set it.
  auto bare = [&](const char* field) -> std::string {
    auto it = names.find(field);
    return it != names.end() ? it->second : std::string(field);
  };
  auto quoted = [&](const char* field) -> std::string {
    auto it = names.find(field);
    return it != names.end() ? it->second : "field \"" + std::string(field) + "\"";
  };
  const std::string at = src.empty() ? "" : src + ": ";
  struct Bounded {
    const char* name;
    int64_t value, limit;
  };
  using L = ConfigLimits;
  for (const Bounded& f : {Bounded{"vocab_size", c.vocab_size, L::vocab_size}, {"hidden_size", c.hidden_size, L::hidden_size},
                           {"num_hidden_layers", c.num_hidden_layers, L::layers},
                           {"num_attention_heads", c.num_attention_heads, L::hidden_size},
                           {"num_key_value_heads", c.num_key_value_heads, L::hidden_size},
                           {"max_position_embeddings", c.max_position_embeddings, L::positions},
                           {"moe_dim", c.moe_dim, L::moe_dim}, {"moe_heads", c.moe_heads, L::moe_heads},
                           {"moe_experts", c.moe_experts, L::moe_experts}, {"moe_topk", c.moe_topk, L::moe_experts},
                           {"moe_groups", c.moe_groups, L::layers}}) {
    if (f.value <= 0) fail(at, quoted(f.name), " must be positive, found ", f.value);
    if (f.value > f.limit) fail(at, quoted(f.name), " = ", f.value, " is too large (at most ", f.limit, ")");
  }
  if (c.hidden_size % c.num_attention_heads != 0)
    fail(at, bare("hidden_size"), " ", c.hidden_size, " is not divisible by ", bare("num_attention_heads"), " ",
         c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail(at, bare("num_attention_heads"), " ", c.num_attention_heads, " is not divisible by ",
         bare("num_key_value_heads"), " ", c.num_key_value_heads);
  if (c.head_dim() % 2 != 0)
    fail(at, "head_dim = ", bare("hidden_size"), " / ", bare("num_attention_heads"), " = ", c.head_dim(),
         " must be even for RoPE");
  if (c.moe_decompose == Decompose::Vertical) {
    if (c.hidden_size % 2 != 0) fail(at, bare("hidden_size"), " ", c.hidden_size, " must be even for moe_decompose \"vertical\"");
    if (c.moe_dim % 2 != 0) fail(at, bare("moe_dim"), " ", c.moe_dim, " must be even for moe_decompose \"vertical\"");
  }
  if (c.moe_topk >= c.moe_experts)
    fail(at, bare("moe_topk"), " ", c.moe_topk, " must be smaller than ", bare("moe_experts"), " ", c.moe_experts);
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
    fail(at, quoted("rms_norm_eps"), " must be positive and finite, found ", c.rms_norm_eps);
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    fail(at, quoted("rope_theta"), " must be positive and finite, found ", c.rope_theta);
  // Token ids are int32 wherever they are used; -1 means none.
  auto check_id = [&](const char* field, int64_t id) {
    if (id < -1 || id > std::numeric_limits<int32_t>::max())
      fail(at, quoted(field), " = ", id, " is not a token id (0 to ", std::numeric_limits<int32_t>::max(), ", or null)");
  };
  check_id("bos_token_id", c.bos_token_id);
  check_id("pad_token_id", c.pad_token_id);
  for (int64_t id : c.eos_token_ids) check_id("eos_token_id", id);
  // The sizes the model forms from these fields: every weight matrix and all
  // together (overflow-safe); the memory they need is checked at load.
  struct Product {
    const char* what;
    uint64_t value;
  };
  const int64_t d = c.hidden_size, E = c.moe_experts;
  for (const Product& p : {Product{"vocab_size x hidden_size (the embedding)", sat_product({c.vocab_size, d})},
                           {"moe_heads x moe_experts x hidden_size (a router)", sat_product({c.moe_heads, E, d})},
                           {"moe_experts x moe_dim x hidden_size (an expert matrix)", sat_product({E, c.moe_dim, d})}})
    if (p.value > uint64_t(L::tensor_elements))
      fail(at, p.what, " = ", p.value, " elements is too large (at most ", L::tensor_elements, " per tensor)");
  const uint64_t params = config_parameter_count(c);
  if (params > uint64_t(L::parameters))
    fail(at, "these sizes make ", params == kSaturated ? std::string("more than 2^64") : std::to_string(params),
         " parameters; at most ", L::parameters, " are supported");
}

MonetConfig load_config(const std::string& path) {
  return parse_config(read_file(path), path);
}

std::string config_to_json(const MonetConfig& c) {
  json j;
  j["architectures"] = {"MonetForCausalLM"};
  j["model_type"] = "monet";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = c.hidden_act;
  j["bos_token_id"] = c.bos_token_id >= 0 ? json(c.bos_token_id) : json(nullptr);
  if (c.eos_token_ids.size() == 1)
    j["eos_token_id"] = c.eos_token_ids[0];
  else if (c.eos_token_ids.empty())
    j["eos_token_id"] = nullptr;
  else
    j["eos_token_id"] = c.eos_token_ids;
  j["pad_token_id"] = c.pad_token_id >= 0 ? json(c.pad_token_id) : json(nullptr);
  j["torch_dtype"] = c.torch_dtype;
  j["moe_dim"] = c.moe_dim;
  j["moe_heads"] = c.moe_heads;
  j["moe_experts"] = c.moe_experts;
  j["moe_topk"] = c.moe_topk;
  j["moe_groups"] = c.moe_groups;
  j["moe_decompose"] = c.decompose_name();
  if (c.quant_block > 0)
    j["quantization_config"] = {{"quant_method", "monet_q8_0"}, {"block_size", c.quant_block}, {"scale_dtype", "F16"}};
  return j.dump(2) + "\n";
}

double normal_quantile(double p) {
  if (!(p > 0.0 && p < 1.0)) {
    if (p == 0.0) return -std::numeric_limits<double>::infinity();
    if (p == 1.0) return std::numeric_limits<double>::infinity();
    return std::numeric_limits<double>::quiet_NaN();
  }
  // Work in the lower half, where Phi(x) = erfc(-x/sqrt2)/2 keeps full relative
  // precision: refining Phi(x) - p near p = 1 would cancel away ~1e-9 of
  // accuracy. For p > 0.5, 1 - p is exact (Sterbenz).
  if (p > 0.5) return -normal_quantile(1.0 - p);
  // Acklam's rational approximation (relative error < 1.2e-9) ...
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01,  -1.328068155288572e+01};
  static const double cc[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                              -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  const double p_low = 0.02425;
  double x;
  if (p < p_low) {
    const double q = std::sqrt(-2 * std::log(p));
    x = (((((cc[0] * q + cc[1]) * q + cc[2]) * q + cc[3]) * q + cc[4]) * q + cc[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  }
  // ... refined by Halley steps on Phi(x) - p (cubic convergence: one step
  // already reaches double precision; the second is cheap insurance).
  const double sqrt_2pi = std::sqrt(2 * std::numbers::pi);
  for (int it = 0; it < 2; it++) {
    const double e = 0.5 * std::erfc(-x / std::numbers::sqrt2) - p;
    const double u = e * sqrt_2pi * std::exp(x * x / 2);  // e / pdf(x)
    if (!std::isfinite(u)) break;  // p deep in the subnormals: exp overflows; keep Acklam's 1e-9
    x = x - u / (1 + x * u / 2);
  }
  return x;
}

}  // namespace monet
