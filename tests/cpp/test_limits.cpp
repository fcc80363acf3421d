// Bounds on sizes from outside (issue 18): config.json fields and the sizes
// the model forms from them, and the memory a model needs at load.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "monet/config.h"
#include "monet/error.h"
#include "monet/memory.h"
#include "monet/model.h"

using ::testing::HasSubstr;

namespace {

const std::string kDefaultModel =
    (std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "models" / "monet-vd-books").string();

std::string tiny_config(const std::string& extra = "") {
  return R"({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "moe_dim": 8, "moe_heads": 2, "moe_experts": 16, "moe_topk": 2, "moe_groups": 2)" +
         extra + "}";
}

void expect_error(const std::string& extra, std::initializer_list<const char*> phrases) {
  SCOPED_TRACE(extra);
  try {
    monet::parse_config(tiny_config(extra), "ckpt/config.json");
    ADD_FAILURE() << "accepted";
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("ckpt/config.json: "));
    for (const char* p : phrases) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// Values that made Model::load allocate before checking (std::bad_alloc) or
// overflow a signed product are refused by name, with the accepted range.
TEST(ConfigLimits, HugeFieldsAreRefusedBeforeAnyAllocation) {
  for (const char* v : {"2147483647", "4611686018427387904", "9223372036854775807"}) {
    expect_error(std::string(R"(, "num_hidden_layers": )") + v, {"\"num_hidden_layers\"", v, "too large", "at most 4096"});
    expect_error(std::string(R"(, "moe_experts": )") + v, {"\"moe_experts\"", "too large", "at most 65536"});
    expect_error(std::string(R"(, "max_position_embeddings": )") + v, {"\"max_position_embeddings\"", "too large"});
    expect_error(std::string(R"(, "moe_groups": )") + v, {"\"moe_groups\"", "too large"});
  }
  expect_error(R"(, "vocab_size": 4294967296)", {"\"vocab_size\"", "too large", "at most 16777216"});
  expect_error(R"(, "hidden_size": 1073741824)", {"\"hidden_size\"", "too large"});
  expect_error(R"(, "moe_heads": 100000)", {"\"moe_heads\"", "too large"});
  expect_error(R"(, "moe_dim": 1000000)", {"\"moe_dim\"", "too large"});
  // 2^64 does not fit: nlohmann reads it as an unsigned integer
  expect_error(R"(, "num_hidden_layers": 18446744073709551615)", {"\"num_hidden_layers\" = 18446744073709551615 is too large"});
}

TEST(ConfigLimits, ProductsAreBounded) {
  // each field in range, their products not
  expect_error(R"(, "vocab_size": 16777216, "hidden_size": 262144, "num_attention_heads": 2048)",
               {"vocab_size x hidden_size", "too large"});
  expect_error(R"(, "hidden_size": 262144, "num_attention_heads": 2048, "moe_experts": 65536, "moe_dim": 128)",
               {"moe_experts x moe_dim x hidden_size", "too large"});
  expect_error(R"(, "hidden_size": 65536, "num_attention_heads": 512, "num_hidden_layers": 4096)",
               {"parameters", "at most 17592186044416"});
  expect_error(R"(, "rms_norm_eps": 1e400)", {"not valid JSON", "overflow"});  // no infinities get in
  expect_error(R"(, "bos_token_id": 1099511627776)", {"\"bos_token_id\"", "not a token id"});
  expect_error(R"(, "eos_token_id": [2, -7])", {"\"eos_token_id\"", "-7", "not a token id"});
  expect_error(R"(, "eos_token_id": 18446744073709551615)", {"\"eos_token_id\" = 18446744073709551615 is too large"});
  expect_error(R"(, "pad_token_id": 18446744073709551615)", {"\"pad_token_id\" = 18446744073709551615 is too large"});
  // a large but consistent config passes
  const monet::MonetConfig c = monet::parse_config(
      tiny_config(R"(, "vocab_size": 256000, "hidden_size": 16384, "num_attention_heads": 128, "num_hidden_layers": 128,
                     "moe_experts": 1024, "moe_dim": 16, "max_position_embeddings": 131072)"),
      "big/config.json");
  EXPECT_EQ(c.num_hidden_layers, 128);
}

TEST(ConfigLimits, OptionNamesReplaceFieldNames) {
  monet::MonetConfig c;
  c.hidden_size = 0;
  try {
    monet::validate_config(c, "", {{"hidden_size", "--hidden"}});
    ADD_FAILURE() << "accepted";
  } catch (const monet::Error& e) {
    EXPECT_STREQ(e.what(), "--hidden must be positive, found 0");
  }
}

// The parameter count the config implies is the checkpoint's.
TEST(ConfigLimits, ParameterCountMatchesTheDefaultModel) {
  auto model = monet::Model::load(kDefaultModel);
  EXPECT_EQ(monet::config_parameter_count(model->config()), uint64_t(model->parameter_count()));
  monet::MonetConfig hd = model->config();
  hd.moe_decompose = monet::Decompose::Horizontal;
  hd.tie_word_embeddings = true;
  EXPECT_EQ(monet::config_parameter_count(hd),
            monet::config_parameter_count(model->config()) - uint64_t(hd.vocab_size * hd.hidden_size));
}

// The estimate is exactly what load copies: the transposed v matrices (in
// the weights' dtype) and every vector as F32.
TEST(MemoryEstimate, MatchesWhatLoadCopies) {
  auto model = monet::Model::load(kDefaultModel);
  const monet::MonetConfig& c = model->config();
  uint64_t copied = model->weights().final_norm.bytes();
  for (const monet::LayerWeights& l : model->weights().layers) {
    const monet::ExpertWeights& x = l.experts;
    for (const monet::Weight* w : {&x.v11, &x.v12, &x.v21, &x.v22, &x.v})
      if (w->owned) copied += w->bytes();
    for (const monet::Weight* v : {&l.input_norm, &l.post_norm, &x.u1_bias, &x.u2_bias, &x.u_bias, &l.router.mean1,
                                   &l.router.var1, &l.router.mean2, &l.router.var2})
      copied += v->bytes();
  }
  const monet::MemoryEstimate est = monet::estimate_load_memory(c, monet::DType::BF16, 0);
  EXPECT_EQ(est.weights, copied);
  EXPECT_EQ(est.kv_cache, 0u);
  const monet::KvCache kv = model->new_cache(100);
  uint64_t kv_bytes = 0;
  for (size_t l = 0; l < kv.k.size(); l++) kv_bytes += kv.k[l].bytes() + kv.v[l].bytes();
  EXPECT_EQ(monet::estimate_load_memory(c, monet::DType::BF16, 100).kv_cache, kv_bytes);
  // F32: the same copies at 4 bytes; F16 (read in place like BF16): 2 bytes
  const uint64_t v_elements = uint64_t(c.hidden_size * c.moe_experts * c.moe_dim * c.num_hidden_layers);
  EXPECT_EQ(monet::estimate_load_memory(c, monet::DType::F32).weights, est.weights + 2 * v_elements);
  EXPECT_EQ(monet::estimate_load_memory(c, monet::DType::F16).weights, est.weights);
}

TEST(MemoryEstimate, TooLargeForTheMachineSaysHowMuch) {
  EXPECT_GT(monet::available_memory_bytes(), uint64_t(1) << 20);
  monet::MonetConfig c = monet::parse_config(
      tiny_config(R"(, "vocab_size": 32000, "hidden_size": 8192, "num_attention_heads": 64, "num_hidden_layers": 64,
                     "moe_experts": 512, "moe_dim": 16, "moe_topk": 8, "moe_heads": 8)"),
      "big/config.json");
  try {
    monet::check_load_memory(c, monet::DType::F16, 4096, "big", /*available=*/uint64_t(8) << 30);
    ADD_FAILURE() << "accepted";
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("big: loading needs "));
    EXPECT_THAT(e.what(), HasSubstr("GiB for converted F16 weights"));
    EXPECT_THAT(e.what(), HasSubstr("for the KV cache of 4096 positions"));
    EXPECT_THAT(e.what(), HasSubstr("but only 8.0 GiB is available"));
  }
  EXPECT_NO_THROW(monet::check_load_memory(c, monet::DType::BF16, 0, "big", /*available=*/uint64_t(1) << 50));
  EXPECT_EQ(monet::format_bytes(1536), "1.5 KiB");
  EXPECT_EQ(monet::format_bytes(17), "17 bytes");
}

}  // namespace
