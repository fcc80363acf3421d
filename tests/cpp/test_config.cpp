// config.json parsing and validation, config_to_json, and normal_quantile.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "monet/config.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "temp_dir.h"

using ::testing::HasSubstr;
using monet_test::TempDir;
using monet_test::write_bytes;

namespace {

const char* const kSource = "ckpt/config.json";

// A small valid config; `extra` (starting with ", ") adds or overrides fields
// (with duplicate keys the last one wins in nlohmann::json).
std::string tiny_config(const std::string& extra = "") {
  return R"({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "moe_dim": 8, "moe_heads": 2, "moe_experts": 16, "moe_topk": 2, "moe_groups": 2)" +
         extra + "}";
}

monet::MonetConfig parse(const std::string& extra) { return monet::parse_config(tiny_config(extra), kSource); }

// parse_config of tiny_config(extra) must fail naming the source and every phrase.
void expect_config_error(const std::string& extra, std::initializer_list<const char*> phrases) {
  SCOPED_TRACE(extra);
  try {
    parse(extra);
    ADD_FAILURE() << "accepted";
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(kSource));
    for (const char* p : phrases) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

TEST(Config, DefaultsAsHf) {
  const monet::MonetConfig c = monet::parse_config("{}", "config.json");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.hidden_act, "relu2");
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.moe_dim, 8);
  EXPECT_EQ(c.moe_heads, 8);
  EXPECT_EQ(c.moe_experts, 512);
  EXPECT_EQ(c.moe_topk, 32);
  EXPECT_EQ(c.moe_groups, 4);
  EXPECT_EQ(c.moe_decompose, monet::Decompose::Vertical);
  EXPECT_STREQ(c.decompose_name(), "vertical");
  EXPECT_EQ(c.head_dim(), 128);
  EXPECT_EQ(c.num_router_layers(), 8);
}

// The released 1.4B VD checkpoint's config.json (abridged: HF adds more keys).
TEST(Config, ReleasedCheckpoint) {
  const monet::MonetConfig c = monet::parse_config(R"({
    "architectures": ["MonetForCausalLM"], "auto_map": {"AutoConfig": "configuration_monet.MonetConfig"},
    "model_type": "monet", "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "relu2", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 2048, "mlp_bias": false, "moe_decompose": "vertical",
    "moe_dim": 16, "moe_experts": 512, "moe_groups": 4, "moe_heads": 8, "moe_topk": 8,
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": true, "vocab_size": 32000})",
                                                   "config.json");
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.moe_dim, 16);
  EXPECT_EQ(c.moe_topk, 8);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.head_dim(), 128);
  EXPECT_EQ(c.num_router_layers(), 6);
  EXPECT_TRUE(c.has_router(0));
  EXPECT_FALSE(c.has_router(3));
  EXPECT_TRUE(c.has_router(4));
  EXPECT_NEAR(c.router_sigma(), 2.1538746940614562, 1e-15);
}

TEST(Config, ParsesFieldsAndIgnoresUnknownOnes) {
  const monet::MonetConfig c =
      parse(R"(, "num_key_value_heads": 2, "eos_token_id": [2, 7], "bos_token_id": null, "pad_token_id": 0,
                "moe_decompose": "horizontal", "tie_word_embeddings": true, "rope_scaling": null,
                "rms_norm_eps": 1e-5, "rope_theta": 500000, "max_position_embeddings": 4096,
                "torch_dtype": "float16", "head_dim": 16, "attention_bias": false,
                "unknown_field": {"ignored": [1, "x"]}, "another": null)");
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.moe_decompose, monet::Decompose::Horizontal);
  EXPECT_STREQ(c.decompose_name(), "horizontal");
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);  // an integer where a number is expected is fine
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.torch_dtype, "float16");
  EXPECT_EQ(c.head_dim(), 16);
  EXPECT_EQ(c.num_router_layers(), 1);
}

TEST(Config, OptionalTokenIds) {
  EXPECT_EQ(parse(R"(, "num_key_value_heads": null)").num_key_value_heads, 4);
  EXPECT_EQ(parse("").num_key_value_heads, 4);
  EXPECT_EQ(parse(R"(, "eos_token_id": 5)").eos_token_ids, (std::vector<int64_t>{5}));
  EXPECT_EQ(parse(R"(, "eos_token_id": [])").eos_token_ids, (std::vector<int64_t>{}));
  EXPECT_EQ(parse(R"(, "eos_token_id": null)").eos_token_ids, (std::vector<int64_t>{}));
  EXPECT_EQ(parse(R"(, "eos_token_id": [128001, 128008, 128009])").eos_token_ids,
            (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(parse(R"(, "bos_token_id": 0)").bos_token_id, 0);
  EXPECT_EQ(parse(R"(, "bos_token_id": null)").bos_token_id, -1);
  EXPECT_EQ(parse("").bos_token_id, 1);
  EXPECT_EQ(parse(R"(, "pad_token_id": null)").pad_token_id, -1);
}

TEST(Config, NewerTransformersSpellings) {
  // transformers >= 4.56 writes "dtype"; v5 moves rope_theta into rope_parameters.
  EXPECT_EQ(parse(R"(, "dtype": "bfloat16")").torch_dtype, "bfloat16");
  EXPECT_EQ(parse(R"(, "dtype": "bfloat16", "torch_dtype": "float16")").torch_dtype, "float16");
  EXPECT_DOUBLE_EQ(parse(R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0})").rope_theta,
                   250000.0);
  EXPECT_DOUBLE_EQ(parse(R"(, "rope_parameters": null)").rope_theta, 10000.0);
  expect_config_error(R"(, "rope_parameters": {"rope_type": "yarn", "factor": 4.0})",
                      {"rope_parameters", "not supported"});
  expect_config_error(R"(, "rope_parameters": "default")", {"rope_parameters", "must be an object"});
}

TEST(Config, RejectsUnsupportedFeatures) {
  expect_config_error(R"(, "rope_scaling": {"type": "linear", "factor": 2})",
                      {"rope_scaling", "{\"factor\":2,\"type\":\"linear\"}", "is not supported"});
  expect_config_error(R"(, "attention_bias": true)", {"attention_bias", "not supported"});
  expect_config_error(R"(, "hidden_act": "silu")", {"hidden_act", "\"silu\"", "relu2"});
  expect_config_error(R"(, "moe_decompose": "diagonal")",
                      {"moe_decompose", "\"diagonal\"", "accepted values", "\"vertical\"", "\"horizontal\""});
  expect_config_error(R"(, "head_dim": 32)", {"head_dim", "32", "hidden_size / num_attention_heads = 16"});
}

TEST(Config, RejectsNonPositiveSizes) {
  for (const char* field : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "max_position_embeddings", "moe_dim", "moe_heads", "moe_experts",
                            "moe_topk", "moe_groups"}) {
    for (int value : {0, -4}) {
      const std::string extra = std::string(", \"") + field + "\": " + std::to_string(value);
      expect_config_error(extra, {field, "must be positive"});
    }
  }
  expect_config_error(R"(, "rms_norm_eps": 0)", {"rms_norm_eps", "positive"});
  expect_config_error(R"(, "rope_theta": -1.0)", {"rope_theta", "positive"});
  expect_config_error(R"(, "vocab_size": 4294967296)", {"vocab_size", "too large"});
}

TEST(Config, RejectsInconsistentShapes) {
  expect_config_error(R"(, "num_attention_heads": 5)", {"hidden_size 64 is not divisible by num_attention_heads 5"});
  expect_config_error(R"(, "num_key_value_heads": 3)",
                      {"num_attention_heads 4 is not divisible by num_key_value_heads 3"});
  expect_config_error(R"(, "num_attention_heads": 64, "num_key_value_heads": 64)", {"head_dim", "1", "even"});
  expect_config_error(R"(, "hidden_size": 12, "num_attention_heads": 4)", {"head_dim", "3", "even"});
  expect_config_error(R"(, "moe_dim": 7)", {"moe_dim 7", "even", "vertical"});
  EXPECT_EQ(parse(R"(, "moe_dim": 7, "moe_decompose": "horizontal")").moe_dim, 7);  // HD has no halves
  expect_config_error(R"(, "moe_topk": 16)", {"moe_topk 16", "smaller than moe_experts 16"});
  expect_config_error(R"(, "moe_topk": 17)", {"moe_topk 17"});
  EXPECT_EQ(parse(R"(, "moe_topk": 15)").moe_topk, 15);
  EXPECT_EQ(parse(R"(, "moe_groups": 5)").num_router_layers(), 1);  // more groups than layers is fine
}

TEST(Config, RejectsWrongJsonTypes) {
  expect_config_error(R"(, "hidden_size": "big")", {"\"hidden_size\"", "must be an integer", "\"big\""});
  expect_config_error(R"(, "hidden_size": 64.5)", {"\"hidden_size\"", "must be an integer"});
  expect_config_error(R"(, "moe_experts": [16])", {"\"moe_experts\"", "must be an integer"});
  expect_config_error(R"(, "num_hidden_layers": true)", {"\"num_hidden_layers\"", "must be an integer"});
  expect_config_error(R"(, "rms_norm_eps": "1e-6")", {"\"rms_norm_eps\"", "must be a number"});
  expect_config_error(R"(, "tie_word_embeddings": 1)", {"\"tie_word_embeddings\"", "true or false"});
  expect_config_error(R"(, "attention_bias": "no")", {"\"attention_bias\"", "true or false"});
  expect_config_error(R"(, "hidden_act": 2)", {"\"hidden_act\"", "must be a string"});
  expect_config_error(R"(, "moe_decompose": 1)", {"\"moe_decompose\"", "must be a string"});
  expect_config_error(R"(, "torch_dtype": {})", {"\"torch_dtype\"", "must be a string"});
  expect_config_error(R"(, "bos_token_id": "<s>")", {"\"bos_token_id\"", "must be an integer"});
  expect_config_error(R"(, "eos_token_id": "x")", {"eos_token_id", "integer or a list of integers"});
  expect_config_error(R"(, "eos_token_id": [2, "x"])", {"eos_token_id", "integer or a list of integers"});
  expect_config_error(R"(, "eos_token_id": 2.5)", {"eos_token_id"});
}

TEST(Config, RejectsNonObjects) {
  for (const char* text : {"{oops", "", "[1, 2]", "42"}) {
    SCOPED_TRACE(text);
    try {
      monet::parse_config(text, kSource);
      ADD_FAILURE() << "accepted";
    } catch (const monet::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(kSource));
    }
  }
  EXPECT_THROW(monet::parse_config("{oops", kSource), monet::Error);
  try {
    monet::parse_config("[]", kSource);
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("must be a JSON object"));
  }
}

TEST(Config, LoadConfig) {
  TempDir dir;
  const std::string path = dir.file("config.json");
  write_bytes(path, tiny_config());
  EXPECT_EQ(monet::load_config(path).hidden_size, 64);
  try {
    monet::load_config(dir.file("missing.json"));
    ADD_FAILURE();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir.file("missing.json") + ": cannot open"));
  }
  try {
    monet::load_config(dir.str());  // a directory, not a file
    ADD_FAILURE();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(dir.str()));
  }
  write_bytes(path, tiny_config(R"(, "moe_topk": 99)"));
  try {
    monet::load_config(path);
    ADD_FAILURE();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path + ": moe_topk 99"));
  }
}

TEST(Config, ToJsonIsHfCompatibleAndRoundTrips) {
  monet::MonetConfig c = parse(R"(, "num_key_value_heads": 2, "eos_token_id": [2, 7], "bos_token_id": null,
                                   "moe_decompose": "horizontal", "tie_word_embeddings": true,
                                   "rms_norm_eps": 1e-5, "rope_theta": 123456.5, "torch_dtype": "bfloat16")");
  const std::string text = monet::config_to_json(c);
  const nlohmann::json j = nlohmann::json::parse(text);
  EXPECT_EQ(j["architectures"], nlohmann::json::array({"MonetForCausalLM"}));
  EXPECT_EQ(j["model_type"], "monet");
  for (const char* key : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                          "rope_scaling", "attention_bias", "tie_word_embeddings", "hidden_act", "bos_token_id",
                          "eos_token_id", "pad_token_id", "torch_dtype", "moe_dim", "moe_heads", "moe_experts",
                          "moe_topk", "moe_groups", "moe_decompose"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_TRUE(j["rope_scaling"].is_null());
  EXPECT_EQ(j["attention_bias"], false);
  EXPECT_TRUE(j["bos_token_id"].is_null());
  EXPECT_TRUE(j["pad_token_id"].is_null());
  EXPECT_EQ(j["eos_token_id"], nlohmann::json::array({2, 7}));
  EXPECT_EQ(j["moe_decompose"], "horizontal");
  EXPECT_EQ(j["hidden_act"], "relu2");

  auto same = [](const monet::MonetConfig& a, const monet::MonetConfig& b) {
    EXPECT_EQ(a.vocab_size, b.vocab_size);
    EXPECT_EQ(a.hidden_size, b.hidden_size);
    EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
    EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
    EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
    EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
    EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);  // exact: JSON doubles round-trip
    EXPECT_EQ(a.rope_theta, b.rope_theta);
    EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
    EXPECT_EQ(a.hidden_act, b.hidden_act);
    EXPECT_EQ(a.bos_token_id, b.bos_token_id);
    EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
    EXPECT_EQ(a.pad_token_id, b.pad_token_id);
    EXPECT_EQ(a.torch_dtype, b.torch_dtype);
    EXPECT_EQ(a.moe_dim, b.moe_dim);
    EXPECT_EQ(a.moe_heads, b.moe_heads);
    EXPECT_EQ(a.moe_experts, b.moe_experts);
    EXPECT_EQ(a.moe_topk, b.moe_topk);
    EXPECT_EQ(a.moe_groups, b.moe_groups);
    EXPECT_EQ(a.moe_decompose, b.moe_decompose);
  };
  same(monet::parse_config(text, "round-trip"), c);
  // Single eos id, no eos, set bos/pad, vertical.
  c = parse(R"(, "eos_token_id": 3, "pad_token_id": 0)");
  EXPECT_EQ(nlohmann::json::parse(monet::config_to_json(c))["eos_token_id"], 3);
  same(monet::parse_config(monet::config_to_json(c), "round-trip"), c);
  c = parse(R"(, "eos_token_id": null)");
  EXPECT_TRUE(nlohmann::json::parse(monet::config_to_json(c))["eos_token_id"].is_null());
  same(monet::parse_config(monet::config_to_json(c), "round-trip"), c);
}

// ---- normal_quantile -----------------------------------------------------------
// Reference values: the correctly rounded Phi^-1 of the double p (mpmath, 60 digits).

TEST(NormalQuantile, KnownValues) {
  EXPECT_EQ(monet::normal_quantile(0.5), 0.0);
  EXPECT_NEAR(monet::normal_quantile(0.975), 1.9599639845400538, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(0.3), -0.5244005127080408, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(0.01), -2.326347874040841, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(0.99), 2.3263478740408408, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(0.02425), -1.972961051311885, 1e-15);  // Acklam's region boundary
  // The router threshold of the released model: Phi^-1(1 - 8/512) = 2.15387469406145621...
  // (scipy.special.ndtri gives 2.1538746940614555, 7e-16 low).
  EXPECT_NEAR(monet::normal_quantile(1.0 - 8.0 / 512.0), 2.1538746940614562, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(1.0 - 32.0 / 512.0), 1.5341205443525463, 1e-15);
}

TEST(NormalQuantile, Tails) {
  EXPECT_NEAR(monet::normal_quantile(1e-5), -4.264890793922825, 1e-14);
  EXPECT_NEAR(monet::normal_quantile(1e-10), -6.361340902404057, 1e-14);
  EXPECT_NEAR(monet::normal_quantile(1.0 - 1e-10), 6.361340889697422, 1e-14);  // the double 1-1e-10 is inexact
  EXPECT_NEAR(monet::normal_quantile(1.0 - 0x1p-53), 8.209536151601387, 1e-14);  // largest double below 1
  EXPECT_NEAR(monet::normal_quantile(1e-300), -37.0470962993612, 1e-13);
  const double smallest = std::numeric_limits<double>::denorm_min();
  EXPECT_NEAR(monet::normal_quantile(smallest), -38.467405617144344, 1e-6);  // finite, not NaN
  EXPECT_EQ(monet::normal_quantile(0.0), -INFINITY);
  EXPECT_EQ(monet::normal_quantile(1.0), INFINITY);
  EXPECT_TRUE(std::isnan(monet::normal_quantile(-0.1)));
  EXPECT_TRUE(std::isnan(monet::normal_quantile(1.5)));
  EXPECT_TRUE(std::isnan(monet::normal_quantile(NAN)));
}

TEST(NormalQuantile, InvertsTheCdf) {
  // Phi(normal_quantile(p)) == p to double precision over the lower half (where
  // Phi = erfc/2 is computed with full relative precision; a one-ulp step in x
  // moves Phi by about (1 + x^2) eps relatively), and the quantile is odd.
  for (double p = 1e-300; p <= 0.5; p *= 1.9) {
    const double x = monet::normal_quantile(p);
    const double phi = 0.5 * std::erfc(-x / std::sqrt(2.0));
    EXPECT_LE(std::abs(phi - p) / p, 2e-15 * (1 + x * x)) << "p = " << p;
    EXPECT_EQ(monet::normal_quantile(1 - p), -monet::normal_quantile(1 - (1 - p))) << "p = " << p;
  }
}

TEST(NormalQuantile, RouterSigma) {
  monet::MonetConfig c;
  c.moe_topk = 8;
  c.moe_experts = 512;
  EXPECT_NEAR(c.router_sigma(), 2.1538746940614562, 1e-15);
  c.moe_topk = 2;
  c.moe_experts = 16;
  EXPECT_EQ(c.router_sigma(), monet::normal_quantile(0.875));
  EXPECT_NEAR(c.router_sigma(), 1.150349380376008, 1e-15);
}

}  // namespace
