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
    if (e.is_number_integer()) {
      c.eos_token_ids.push_back(e.get<int64_t>());
    } else if (e.is_array()) {
      for (const json& v : e) {
        if (!v.is_number_integer()) fail(src, ": field \"eos_token_id\" must be an integer or a list of integers");
        c.eos_token_ids.push_back(v.get<int64_t>());
      }
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
  if (get_field<bool>(j, "attention_bias", false, src))
    fail(src, ": field \"attention_bias\" = true is not supported (Monet attention has no biases)");
  if (c.hidden_act != "relu2")
    fail(src, ": field \"hidden_act\" is \"", c.hidden_act, "\"; Monet experts use \"relu2\" (relu(x)^2)");

  struct Positive {
    const char* name;
    int64_t value;
  };
  for (const Positive& p : {Positive{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                            {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
                            {"num_key_value_heads", c.num_key_value_heads},
                            {"max_position_embeddings", c.max_position_embeddings}, {"moe_dim", c.moe_dim},
                            {"moe_heads", c.moe_heads}, {"moe_experts", c.moe_experts}, {"moe_topk", c.moe_topk},
                            {"moe_groups", c.moe_groups}})
    if (p.value <= 0) fail(src, ": field \"", p.name, "\" must be positive, found ", p.value);
  if (c.hidden_size % c.num_attention_heads != 0)
    fail(src, ": hidden_size ", c.hidden_size, " is not divisible by num_attention_heads ", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail(src, ": num_attention_heads ", c.num_attention_heads, " is not divisible by num_key_value_heads ",
         c.num_key_value_heads);
  // Llama configs may carry head_dim; Monet's attention assumes d / nh.
  if (const int64_t hd = get_field<int64_t>(j, "head_dim", c.head_dim(), src); hd != c.head_dim())
    fail(src, ": field \"head_dim\" is ", hd, " but hidden_size / num_attention_heads = ", c.head_dim(),
         "; a separate head_dim is not supported");
  if (c.head_dim() % 2 != 0) fail(src, ": head_dim = hidden_size / num_attention_heads = ", c.head_dim(), " must be even for RoPE");
  if (c.moe_decompose == Decompose::Vertical) {
    if (c.hidden_size % 2 != 0) fail(src, ": hidden_size ", c.hidden_size, " must be even for moe_decompose \"vertical\"");
    if (c.moe_dim % 2 != 0) fail(src, ": moe_dim ", c.moe_dim, " must be even for moe_decompose \"vertical\"");
  }
  if (c.moe_topk >= c.moe_experts)
    fail(src, ": moe_topk ", c.moe_topk, " must be smaller than moe_experts ", c.moe_experts);
  if (!(c.rms_norm_eps > 0)) fail(src, ": field \"rms_norm_eps\" must be positive");
  if (!(c.rope_theta > 0)) fail(src, ": field \"rope_theta\" must be positive");
  if (c.vocab_size > std::numeric_limits<int32_t>::max()) fail(src, ": vocab_size ", c.vocab_size, " is too large");
  return c;
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
