// safetensors reader/writer on good and corrupt files; config.json validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "monet/config.h"
#include "monet/error.h"
#include "monet/safetensors.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("monet_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A safetensors file from a header JSON text and a data section.
std::string raw_file(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

// Expects SafetensorsFile(path) to throw monet::Error whose message contains
// the path and every phrase given.
void expect_open_error(const std::string& path, std::initializer_list<const char*> phrases) {
  try {
    monet::SafetensorsFile f(path);
    FAIL() << "opened a corrupt file: " << path;
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
    for (const char* p : phrases) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

TEST(Safetensors, RoundTripDtypesAndMetadata) {
  TempDir dir;
  std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -8.5f};
  std::vector<uint16_t> bf16 = {monet::f32_to_bf16(1.0f), monet::f32_to_bf16(-3.5f)};
  std::vector<uint16_t> f16 = {monet::f32_to_f16(0.5f), monet::f32_to_f16(-65504.0f), monet::f32_to_f16(1e-7f)};
  int64_t scalar = 42;
  const std::string path = dir.file("t.safetensors");
  monet::write_safetensors(path,
                           {{"a.weight", monet::DType::F32, {2, 3}, f32.data()},
                            {"b", monet::DType::BF16, {2}, bf16.data()},
                            {"c", monet::DType::F16, {3}, f16.data()},
                            {"n", monet::DType::I64, {}, &scalar},
                            {"empty", monet::DType::F32, {0, 4}, nullptr}},
                           {{"format", "pt"}});
  monet::SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 5u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  const monet::TensorInfo* a = f.find("a.weight");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, monet::DType::F32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(a->data, f32.data(), 24), 0);
  EXPECT_EQ(f.find("b")->dtype, monet::DType::BF16);
  EXPECT_EQ(std::memcmp(f.find("c")->data, f16.data(), 6), 0);
  EXPECT_EQ(f.find("n")->numel(), 1);
  EXPECT_EQ(f.find("empty")->numel(), 0);
  EXPECT_EQ(f.find("missing"), nullptr);
  // The header is padded so that the data section starts 8-byte aligned.
  uint64_t header_len;
  std::memcpy(&header_len, read_bytes(path).data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
}

TEST(Safetensors, ShortFile) {
  TempDir dir;
  write_bytes(dir.file("short.safetensors"), "abc");
  expect_open_error(dir.file("short.safetensors"), {"8-byte"});
}

TEST(Safetensors, HeaderTooLarge) {
  TempDir dir;
  uint64_t n = monet::SafetensorsFile::kMaxHeaderBytes + 1;
  write_bytes(dir.file("big.safetensors"), std::string(reinterpret_cast<const char*>(&n), 8) + "{}");
  expect_open_error(dir.file("big.safetensors"), {"exceeds"});
}

TEST(Safetensors, HeaderLongerThanFile) {
  TempDir dir;
  uint64_t n = 1000;
  write_bytes(dir.file("h.safetensors"), std::string(reinterpret_cast<const char*>(&n), 8) + "{}");
  expect_open_error(dir.file("h.safetensors"), {"truncated", "header length 1000"});
}

TEST(Safetensors, InvalidJson) {
  TempDir dir;
  write_bytes(dir.file("j.safetensors"), raw_file("{not json", ""));
  expect_open_error(dir.file("j.safetensors"), {"not valid JSON"});
  write_bytes(dir.file("arr.safetensors"), raw_file("[1,2]", ""));
  expect_open_error(dir.file("arr.safetensors"), {"JSON object"});
}

TEST(Safetensors, BadEntries) {
  TempDir dir;
  struct Case {
    const char* header;
    const char* phrase;
  };
  const Case cases[] = {
      {R"({"w":{"shape":[2],"data_offsets":[0,8]}})", "\"dtype\""},
      {R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", "\"shape\""},
      {R"({"w":{"dtype":"F32","shape":[2]}})", "data_offsets"},
      {R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", "unknown dtype \"Q4\""},
      {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "non-negative"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "begin > end"},
      {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "expected 12"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":1}})", "__metadata__"},
  };
  int n = 0;
  for (const Case& c : cases) {
    const std::string path = dir.file("bad" + std::to_string(n++) + ".safetensors");
    write_bytes(path, raw_file(c.header, std::string(16, '\0')));
    expect_open_error(path, {c.phrase});
  }
}

TEST(Safetensors, TruncatedData) {
  TempDir dir;
  const std::string path = dir.file("trunc.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(10, '\0')));
  expect_open_error(path, {"truncated", "tensor w", "10 bytes"});
}

TEST(Safetensors, OverlappingTensors) {
  TempDir dir;
  const std::string path = dir.file("overlap.safetensors");
  write_bytes(path, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(12, '\0')));
  expect_open_error(path, {"overlap", "a", "b"});
}

TEST(Safetensors, MissingFile) {
  TempDir dir;
  expect_open_error(dir.file("none.safetensors"), {"cannot open"});
}

// A 3-shard checkpoint directory with an index.
void write_sharded(const TempDir& dir, const nlohmann::json& weight_map) {
  std::vector<float> v = {1, 2, 3, 4};
  monet::write_safetensors(dir.file("s1.safetensors"), {{"a", monet::DType::F32, {4}, v.data()}});
  monet::write_safetensors(dir.file("s2.safetensors"), {{"b", monet::DType::F32, {2, 2}, v.data()}});
  monet::write_safetensors(dir.file("s3.safetensors"), {{"c", monet::DType::F32, {1}, v.data()}});
  nlohmann::json index = {{"metadata", {{"total_size", 36}}}, {"weight_map", weight_map}};
  write_bytes(dir.file("model.safetensors.index.json"), index.dump());
}

TEST(TensorStore, ShardedCheckpoint) {
  TempDir dir;
  write_sharded(dir, {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}, {"c", "s3.safetensors"}});
  auto store = monet::TensorStore::open_dir(dir.path().string());
  EXPECT_EQ(store->names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(store->get("b").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_THAT(store->get("c").file, HasSubstr("s3.safetensors"));
  try {
    store->get("zzz");
    FAIL();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("missing tensor zzz"));
  }
}

TEST(TensorStore, ShardErrors) {
  {
    TempDir dir;
    write_sharded(dir, {{"a", "s1.safetensors"}, {"b", "gone.safetensors"}});
    try {
      monet::TensorStore::open_dir(dir.path().string());
      FAIL();
    } catch (const monet::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("gone.safetensors"));
      EXPECT_THAT(e.what(), HasSubstr("does not exist"));
    }
  }
  {
    TempDir dir;
    write_sharded(dir, {{"a", "s1.safetensors"}, {"x", "s2.safetensors"}});
    try {
      monet::TensorStore::open_dir(dir.path().string());
      FAIL();
    } catch (const monet::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("tensor x listed in the index is missing"));
    }
  }
  {
    TempDir dir;
    std::vector<float> v = {1, 2, 3, 4};
    write_sharded(dir, {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
    monet::write_safetensors(dir.file("s2.safetensors"),
                             {{"a", monet::DType::F32, {4}, v.data()}, {"b", monet::DType::F32, {2, 2}, v.data()}});
    try {
      monet::TensorStore::open_dir(dir.path().string());
      FAIL();
    } catch (const monet::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("tensor a appears in both"));
    }
  }
  {
    TempDir dir;
    try {
      monet::TensorStore::open_dir(dir.path().string());
      FAIL();
    } catch (const monet::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("no model.safetensors or model.safetensors.index.json"));
    }
  }
}

TEST(AtomicWrite, FailureLeavesNothingAndKeepsOldFile) {
  TempDir dir;
  std::vector<float> v = {1, 2};
  // Into a directory that does not exist: an error naming the path, nothing created.
  const std::string bad = dir.file("no/such/dir/x.safetensors");
  EXPECT_THROW(monet::write_safetensors(bad, {{"v", monet::DType::F32, {2}, v.data()}}), monet::Error);
  EXPECT_FALSE(fs::exists(dir.path() / "no"));
  // A failing write (tensor with no data) leaves the existing file intact and no temp file.
  const std::string path = dir.file("keep.safetensors");
  monet::write_safetensors(path, {{"v", monet::DType::F32, {2}, v.data()}});
  const std::string before = read_bytes(path);
  EXPECT_THROW(monet::write_safetensors(path, {{"v", monet::DType::F32, {2}, nullptr}}), monet::Error);
  EXPECT_THROW(monet::write_safetensors(path, {{"v", monet::DType::F32, {2}, v.data()}, {"v", monet::DType::F32, {2}, v.data()}}),
               monet::Error);
  EXPECT_EQ(read_bytes(path), before);
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
}

TEST(DType, HalfAndBfloatConversions) {
  EXPECT_EQ(monet::f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(monet::f32_to_bf16(-2.0f), 0xc000);
  // round to nearest even: 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7
  EXPECT_EQ(monet::f32_to_bf16(1.00390625f), 0x3f80);
  EXPECT_EQ(monet::f32_to_bf16(1.01171875f), 0x3f82);
  EXPECT_EQ(monet::bf16_to_f32(0x3fc0), 1.5f);
  EXPECT_EQ(monet::f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(monet::f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(monet::f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(monet::f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(monet::f32_to_f16(5.960464477539063e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(monet::f16_to_f32(0x0001), 5.960464477539063e-08f);
  EXPECT_EQ(monet::f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isinf(monet::f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(monet::f32_to_f16(NAN))));
  for (uint32_t h = 0; h < 0x7c00; h++)  // every finite positive half round-trips
    ASSERT_EQ(monet::f32_to_f16(monet::f16_to_f32(uint16_t(h))), h) << h;
}

// ---- config.json ----------------------------------------------------------

std::string tiny_config(const std::string& extra = "") {
  return R"({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "moe_dim": 8, "moe_heads": 2, "moe_experts": 16, "moe_topk": 2, "moe_groups": 2)" +
         extra + "}";
}

void expect_config_error(const std::string& extra, std::initializer_list<const char*> phrases) {
  try {
    monet::parse_config(tiny_config(extra), "cfg/config.json");
    FAIL() << "accepted: " << extra;
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("cfg/config.json"));
    for (const char* p : phrases) EXPECT_THAT(e.what(), HasSubstr(p)) << extra;
  }
}

TEST(Config, DefaultsAsHf) {
  monet::MonetConfig c = monet::parse_config("{}", "config.json");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_key_value_heads, c.num_attention_heads);
  EXPECT_EQ(c.moe_topk, 32);
  EXPECT_EQ(c.moe_dim, 8);
  EXPECT_EQ(c.moe_decompose, monet::Decompose::Vertical);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));
}

TEST(Config, ParsesFields) {
  monet::MonetConfig c = monet::parse_config(
      tiny_config(R"(, "num_key_value_heads": 2, "eos_token_id": [2, 7], "bos_token_id": null,
                      "moe_decompose": "horizontal", "tie_word_embeddings": true, "rope_scaling": null,
                      "unknown_field": {"ignored": true})"),
      "config.json");
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.moe_decompose, monet::Decompose::Horizontal);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim(), 16);
  EXPECT_EQ(c.num_router_layers(), 1);
  // config_to_json round-trips
  monet::MonetConfig back = monet::parse_config(monet::config_to_json(c), "round-trip");
  EXPECT_EQ(back.num_key_value_heads, 2);
  EXPECT_EQ(back.eos_token_ids, c.eos_token_ids);
  EXPECT_EQ(back.moe_decompose, c.moe_decompose);
  EXPECT_EQ(back.bos_token_id, -1);
}

TEST(Config, RejectsInvalid) {
  expect_config_error(R"(, "moe_decompose": "diagonal")", {"moe_decompose", "diagonal", "vertical", "horizontal"});
  expect_config_error(R"(, "rope_scaling": {"type": "linear", "factor": 2})", {"rope_scaling", "not supported"});
  expect_config_error(R"(, "attention_bias": true)", {"attention_bias"});
  expect_config_error(R"(, "hidden_act": "silu")", {"hidden_act", "silu", "relu2"});
  expect_config_error(R"(, "num_key_value_heads": 3)", {"num_key_value_heads 3"});
  expect_config_error(R"(, "num_attention_heads": 5)", {"not divisible by num_attention_heads 5"});
  expect_config_error(R"(, "moe_dim": 7)", {"moe_dim 7", "even"});
  expect_config_error(R"(, "moe_topk": 16)", {"moe_topk 16", "moe_experts 16"});
  expect_config_error(R"(, "moe_groups": 0)", {"moe_groups", "positive"});
  expect_config_error(R"(, "hidden_size": "big")", {"hidden_size", "integer", "big"});
  expect_config_error(R"(, "eos_token_id": "x")", {"eos_token_id"});
  expect_config_error(R"(, "num_attention_heads": 64, "num_key_value_heads": 64)", {"head_dim", "even"});
  try {
    monet::parse_config("{oops", "cfg/config.json");
    FAIL();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("not valid JSON"));
  }
  try {
    monet::load_config("/nonexistent/config.json");
    FAIL();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/nonexistent/config.json"));
  }
}

TEST(Config, NormalQuantile) {
  EXPECT_NEAR(monet::normal_quantile(0.5), 0.0, 1e-15);
  EXPECT_NEAR(monet::normal_quantile(0.975), 1.959963984540054, 1e-14);
  EXPECT_NEAR(monet::normal_quantile(1.0 - 8.0 / 512.0), 2.1538746940614555, 1e-14);
  EXPECT_NEAR(monet::normal_quantile(1e-10), -6.361340902404056, 1e-12);
  EXPECT_NEAR(monet::normal_quantile(1.0 - 1e-10), 6.361340889697422, 1e-7);  // 1 - 1e-10 is inexact in double
  EXPECT_NEAR(monet::normal_quantile(0.01), -2.3263478740408408, 1e-14);
  monet::MonetConfig c;
  c.moe_topk = 8;
  c.moe_experts = 512;
  EXPECT_NEAR(c.router_sigma(), 2.1538746940614555, 1e-14);
}

}  // namespace
