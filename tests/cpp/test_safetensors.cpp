// safetensors reading (good, corrupt and sharded checkpoints), atomic writing,
// and the dtype table and half/bfloat16 conversions.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "monet/dtype.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "temp_dir.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using monet::DType;
using monet_test::read_bytes;
using monet_test::TempDir;
using monet_test::write_bytes;

namespace {

// A safetensors file from a header JSON text and a data section.
std::string raw_file(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

std::string u64_bytes(uint64_t n) { return std::string(reinterpret_cast<const char*>(&n), 8); }

// Runs `f`, which must throw monet::Error; returns its message.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const monet::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no monet::Error thrown";
  return "";
}

// Expects SafetensorsFile(path) to throw monet::Error whose message contains
// the path and every phrase given.
void expect_open_error(const std::string& path, std::initializer_list<const char*> phrases) {
  const std::string msg = error_of([&] { monet::SafetensorsFile f(path); });
  EXPECT_THAT(msg, HasSubstr(path));
  for (const char* p : phrases) EXPECT_THAT(msg, HasSubstr(p)) << "file " << path;
}

// Names of leftover "<x>.tmp.<pid>" files in a directory.
std::vector<std::string> temp_files(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) out.push_back(e.path().string());
  return out;
}

// ---- reading what we wrote -------------------------------------------------

TEST(Safetensors, RoundTripEveryDtypeAndMetadata) {
  TempDir dir;
  const std::vector<double> f64 = {1.0 / 3, -1e300};
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -8.5f};
  const std::vector<uint16_t> f16 = {monet::f32_to_f16(0.5f), monet::f32_to_f16(-65504.0f), monet::f32_to_f16(1e-7f)};
  const std::vector<uint16_t> bf16 = {monet::f32_to_bf16(1.0f), monet::f32_to_bf16(-3.5f)};
  const std::vector<int64_t> i64 = {std::numeric_limits<int64_t>::min(), 42, -1};
  const std::vector<int32_t> i32 = {-7, 1 << 30};
  const std::vector<int16_t> i16 = {-32768, 32767, 0, 5};
  const std::vector<int8_t> i8 = {-128, 127, 3};
  const std::vector<uint8_t> u8 = {255, 0, 9};
  const std::vector<uint8_t> boolean = {1, 0, 1, 1};
  const int64_t scalar = 7;
  const std::string path = dir.file("t.safetensors");
  monet::write_safetensors(path,
                           {{"a.weight", DType::F32, {2, 3}, f32.data()},
                            {"f64", DType::F64, {2}, f64.data()},
                            {"half", DType::F16, {3}, f16.data()},
                            {"bf", DType::BF16, {2, 1}, bf16.data()},
                            {"i64", DType::I64, {3}, i64.data()},
                            {"i32", DType::I32, {2}, i32.data()},
                            {"i16", DType::I16, {2, 2}, i16.data()},
                            {"i8", DType::I8, {3}, i8.data()},
                            {"u8", DType::U8, {3}, u8.data()},
                            {"mask", DType::BOOL, {4}, boolean.data()},
                            {"scalar", DType::I64, {}, &scalar},
                            {"empty", DType::F32, {0, 4}, nullptr}},
                           {{"format", "pt"}, {"note", "ünïcode ✓"}});
  monet::SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.tensors().size(), 12u);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode ✓"}}));

  auto check = [&](const char* name, DType dtype, std::vector<int64_t> shape, const void* data) {
    SCOPED_TRACE(name);
    const monet::TensorInfo* t = f.find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->name, name);
    EXPECT_EQ(t->dtype, dtype);
    EXPECT_EQ(t->shape, shape);
    EXPECT_EQ(t->file, path);
    EXPECT_EQ(t->nbytes, size_t(t->numel()) * monet::dtype_size(dtype));
    if (t->nbytes) {
      EXPECT_EQ(std::memcmp(t->data, data, t->nbytes), 0);
    }
  };
  check("a.weight", DType::F32, {2, 3}, f32.data());
  check("f64", DType::F64, {2}, f64.data());
  check("half", DType::F16, {3}, f16.data());
  check("bf", DType::BF16, {2, 1}, bf16.data());
  check("i64", DType::I64, {3}, i64.data());
  check("i32", DType::I32, {2}, i32.data());
  check("i16", DType::I16, {2, 2}, i16.data());
  check("i8", DType::I8, {3}, i8.data());
  check("u8", DType::U8, {3}, u8.data());
  check("mask", DType::BOOL, {4}, boolean.data());
  check("scalar", DType::I64, {}, &scalar);
  check("empty", DType::F32, {0, 4}, nullptr);
  EXPECT_EQ(f.find("scalar")->numel(), 1);
  EXPECT_EQ(f.find("empty")->numel(), 0);
  EXPECT_EQ(f.find("a.weight")->shape_str(), "[2, 3]");
  EXPECT_EQ(f.find("scalar")->shape_str(), "[]");
  EXPECT_EQ(f.find("missing"), nullptr);
}

TEST(Safetensors, WrittenLayoutIsTheStandardOne) {
  TempDir dir;
  const std::vector<float> a = {1, 2};
  const std::vector<int8_t> b = {1, 2, 3};
  const std::string path = dir.file("layout.safetensors");
  monet::write_safetensors(path, {{"z_first", DType::F32, {2}, a.data()}, {"b", DType::I8, {3}, b.data()}},
                           {{"k", "v"}});
  const std::string bytes = read_bytes(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u) << "header padded so the data section is 8-byte aligned";
  ASSERT_EQ(bytes.size(), 8 + n + 8 + 3) << "data tightly packed";
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_last_not_of(' '), header.find_last_of('}')) << "padding is spaces after the JSON";
  const nlohmann::json j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"], (nlohmann::json{{"k", "v"}}));
  // Data in the order given, not sorted by name.
  EXPECT_EQ(j["z_first"], (nlohmann::json{{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}));
  EXPECT_EQ(j["b"], (nlohmann::json{{"dtype", "I8"}, {"shape", {3}}, {"data_offsets", {8, 11}}}));
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + n, a.data(), 8), 0);
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + n + 8, b.data(), 3), 0);
  // No metadata: no "__metadata__" key at all.
  monet::write_safetensors(path, {{"b", DType::I8, {3}, b.data()}});
  monet::SafetensorsFile f(path);
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(read_bytes(path).find("__metadata__"), std::string::npos);
}

TEST(Safetensors, ReadsForeignLayouts) {
  TempDir dir;
  // Offsets need not follow header order, gaps are tolerated, and an empty
  // tensor may share its offset with the next tensor (HF writers do that).
  const std::string path = dir.file("foreign.safetensors");
  write_bytes(path, raw_file(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},)"
                             R"("g":{"dtype":"U8","shape":[1],"data_offsets":[20,21]},)"
                             R"("__metadata__":{"format":"pt"}}   )",
                             std::string(24, '\x01')));
  monet::SafetensorsFile f(path);
  EXPECT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.find("b")->data - f.find("a")->data, 8);
  EXPECT_EQ(f.find("e")->nbytes, 0u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  // A header with no tensors at all is a valid (empty) file.
  write_bytes(path, raw_file("{}", ""));
  EXPECT_TRUE(monet::SafetensorsFile(path).tensors().empty());
}

// ---- corrupt files -----------------------------------------------------------

TEST(SafetensorsCorrupt, ShorterThanLengthField) {
  TempDir dir;
  write_bytes(dir.file("short.safetensors"), "abc");
  expect_open_error(dir.file("short.safetensors"), {"3 bytes", "8-byte"});
  write_bytes(dir.file("empty.safetensors"), "");
  expect_open_error(dir.file("empty.safetensors"), {"0 bytes"});
}

TEST(SafetensorsCorrupt, HeaderLengthOverLimit) {
  TempDir dir;
  write_bytes(dir.file("big.safetensors"), u64_bytes(monet::SafetensorsFile::kMaxHeaderBytes + 1) + "{}");
  expect_open_error(dir.file("big.safetensors"), {"exceeds the limit"});
  write_bytes(dir.file("huge.safetensors"), u64_bytes(~uint64_t(0)) + "{}");  // must not wrap around
  expect_open_error(dir.file("huge.safetensors"), {"exceeds the limit"});
}

TEST(SafetensorsCorrupt, HeaderLongerThanFile) {
  TempDir dir;
  write_bytes(dir.file("h.safetensors"), u64_bytes(1000) + "{}");
  expect_open_error(dir.file("h.safetensors"), {"truncated", "header length 1000", "only 2 bytes"});
}

TEST(SafetensorsCorrupt, HeaderNotJsonObject) {
  TempDir dir;
  const struct {
    const char* header;
    const char* phrase;
  } cases[] = {
      {"{not json", "not valid JSON"},
      {"", "not valid JSON"},
      {R"({"a":1} trailing)", "not valid JSON"},
      {"[1,2]", "must be a JSON object"},
      {"\"text\"", "must be a JSON object"},
  };
  int n = 0;
  for (const auto& c : cases) {
    const std::string path = dir.file("j" + std::to_string(n++) + ".safetensors");
    write_bytes(path, raw_file(c.header, ""));
    expect_open_error(path, {c.phrase});
  }
}

TEST(SafetensorsCorrupt, BadEntries) {
  TempDir dir;
  const struct {
    const char* header;
    std::vector<const char*> phrases;
  } cases[] = {
      {R"({"w":5})", {"tensor w", "must be an object"}},
      {R"({"w":{"shape":[2],"data_offsets":[0,8]}})", {"tensor w", "\"dtype\""}},
      {R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", {"tensor w", "\"dtype\""}},
      {R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", {"tensor w", "\"shape\""}},
      {R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", {"tensor w", "\"shape\""}},
      {R"({"w":{"dtype":"F32","shape":[2]}})", {"tensor w", "data_offsets"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", {"tensor w", "[begin, end]"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", {"tensor w", "[begin, end]"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":"0-8"}})", {"tensor w", "[begin, end]"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", {"tensor w", "non-negative"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", {"tensor w", "non-negative"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8.0]}})", {"tensor w", "non-negative"}},
      {R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", {"tensor w", "unknown dtype \"Q4\""}},
      {R"({"w":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", {"unknown dtype \"f32\""}},
      {R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", {"tensor w", "non-negative"}},
      {R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", {"tensor w", "non-negative integers"}},
      {R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", {"tensor w", "non-negative integers"}},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", {"tensor w", "begin > end"}},
      {R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", {"tensor w", "8 bytes", "[3]", "expected 12"}},
      {R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", {"tensor w", "16 bytes", "BF16", "expected 8"}},
      {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", {"tensor w", "too large"}},
      {R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", {"tensor w"}},
      {R"({"__metadata__":{"k":1}})", {"__metadata__", "must be a string"}},
      {R"({"__metadata__":"pt"})", {"__metadata__", "object of strings"}},
      {R"({"__metadata__":["pt"]})", {"__metadata__", "object of strings"}},
  };
  int n = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.header);
    const std::string path = dir.file("bad" + std::to_string(n++) + ".safetensors");
    write_bytes(path, raw_file(c.header, std::string(16, '\0')));
    const std::string msg = error_of([&] { monet::SafetensorsFile f(path); });
    EXPECT_THAT(msg, HasSubstr(path));
    for (const char* p : c.phrases) EXPECT_THAT(msg, HasSubstr(p));
  }
}

TEST(SafetensorsCorrupt, TruncatedDataSection) {
  TempDir dir;
  const std::string path = dir.file("trunc.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(10, '\0')));
  expect_open_error(path, {"truncated: tensor w needs bytes [0, 16) but the data section has 10 bytes"});
  // A file cut short after a good write, as by a full disk or an interrupted copy.
  std::vector<float> v(64, 1.0f);
  monet::write_safetensors(path, {{"a", DType::F32, {32}, v.data()}, {"b", DType::F32, {32}, v.data()}});
  fs::resize_file(path, fs::file_size(path) - 1);
  expect_open_error(path, {"truncated: tensor b needs bytes [128, 256)", "has 255 bytes"});
}

TEST(SafetensorsCorrupt, OverlappingTensors) {
  TempDir dir;
  const std::string path = dir.file("overlap.safetensors");
  write_bytes(path, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(12, '\0')));
  expect_open_error(path, {"tensors a and b overlap"});
  // Same bytes twice (an aliased tensor) is an overlap too.
  write_bytes(path, raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("y":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                             std::string(8, '\0')));
  expect_open_error(path, {"overlap", "x", "y"});
  // An empty tensor strictly inside another one's bytes is one as well.
  write_bytes(path, raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                             std::string(8, '\0')));
  expect_open_error(path, {"overlap"});
}

TEST(SafetensorsCorrupt, MissingOrNotAFile) {
  TempDir dir;
  expect_open_error(dir.file("none.safetensors"), {"cannot open", "No such file"});
  fs::create_directory(dir.file("adir.safetensors"));
  expect_open_error(dir.file("adir.safetensors"), {"not a regular file"});
}

// ---- checkpoint directories --------------------------------------------------

// A 3-shard checkpoint directory (s1 holds two tensors) with an index.
void write_sharded(const TempDir& dir, const nlohmann::json& weight_map) {
  const std::vector<float> v = {1, 2, 3, 4};
  monet::write_safetensors(dir.file("s1.safetensors"), {{"a", DType::F32, {4}, v.data()}, {"a2", DType::F32, {1}, v.data()}});
  monet::write_safetensors(dir.file("s2.safetensors"), {{"b", DType::F32, {2, 2}, v.data()}});
  monet::write_safetensors(dir.file("s3.safetensors"), {{"c", DType::BF16, {1}, v.data()}});
  const nlohmann::json index = {{"metadata", {{"total_size", 38}}}, {"weight_map", weight_map}};
  write_bytes(dir.file("model.safetensors.index.json"), index.dump(2));
}

const nlohmann::json kFullMap = {
    {"a", "s1.safetensors"}, {"a2", "s1.safetensors"}, {"b", "s2.safetensors"}, {"c", "s3.safetensors"}};

std::string open_dir_error(const std::string& dir) {
  return error_of([&] { monet::TensorStore::open_dir(dir); });
}

TEST(TensorStore, ShardedCheckpoint) {
  TempDir dir;
  write_sharded(dir, kFullMap);
  auto store = monet::TensorStore::open_dir(dir.str());
  EXPECT_EQ(store->source(), dir.str());
  EXPECT_EQ(store->names(), (std::vector<std::string>{"a", "a2", "b", "c"}));
  EXPECT_EQ(store->get("b").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(store->get("c").dtype, DType::BF16);
  EXPECT_EQ(store->get("a").file, dir.file("s1.safetensors"));
  EXPECT_EQ(store->get("c").file, dir.file("s3.safetensors"));
  EXPECT_EQ(reinterpret_cast<const float*>(store->get("a").data)[3], 4.0f);
  EXPECT_EQ(store->find("zzz"), nullptr);
  const std::string msg = error_of([&] { store->get("zzz"); });
  EXPECT_EQ(msg, dir.str() + ": missing tensor zzz");
}

TEST(TensorStore, IndexWinsOverSingleFile) {
  TempDir dir;
  write_sharded(dir, kFullMap);
  const std::vector<float> v = {9};
  monet::write_safetensors(dir.file("model.safetensors"), {{"stale", DType::F32, {1}, v.data()}});
  auto store = monet::TensorStore::open_dir(dir.str());
  EXPECT_EQ(store->find("stale"), nullptr);
  EXPECT_NE(store->find("a"), nullptr);
}

TEST(TensorStore, SingleFileDirectory) {
  TempDir dir;
  const std::vector<float> v = {1, 2};
  monet::write_safetensors(dir.file("model.safetensors"), {{"w", DType::F32, {2}, v.data()}});
  auto store = monet::TensorStore::open_dir(dir.str());
  EXPECT_EQ(store->source(), dir.str());
  EXPECT_EQ(store->names(), (std::vector<std::string>{"w"}));
  EXPECT_EQ(store->get("w").file, dir.file("model.safetensors"));
  EXPECT_EQ(error_of([&] { store->get("x"); }), dir.str() + ": missing tensor x");
}

TEST(TensorStore, OpenFile) {
  TempDir dir;
  const std::vector<float> v = {1, 2};
  const std::string path = dir.file("any-name.safetensors");
  monet::write_safetensors(path, {{"w", DType::F32, {2}, v.data()}});
  auto store = monet::TensorStore::open_file(path);
  EXPECT_EQ(store->source(), path);
  EXPECT_EQ(store->get("w").numel(), 2);
  EXPECT_EQ(error_of([&] { store->get("x"); }), path + ": missing tensor x");
  EXPECT_THAT(error_of([&] { monet::TensorStore::open_file(dir.file("nope.safetensors")); }),
              HasSubstr("nope.safetensors: cannot open"));
}

// Files are mapped at a 2 MiB boundary (so that the page cache's 2 MiB pages
// of them map whole); reading a file again into huge pages and releasing a
// tensor's pages both leave its values as written.
TEST(TensorStore, HugePageMappingReadsTheFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  std::vector<float> v((size_t(5) << 20) / 4 + 3);
  for (size_t i = 0; i < v.size(); i++) v[i] = float(i % 1000) * 0.5f;
  monet::write_safetensors(path, {{"w", DType::F32, {int64_t(v.size())}, v.data()}});
  auto store = monet::TensorStore::open_dir(dir.str());
  const monet::TensorInfo& w = store->get("w");
  uint64_t header = 0;
  std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(&header), 8);
  EXPECT_EQ((reinterpret_cast<uintptr_t>(w.data) - 8 - header) % (uintptr_t(2) << 20), 0u)
      << "the file is not mapped at a 2 MiB boundary";
  auto same = [&] { return std::memcmp(w.data, v.data(), v.size() * 4) == 0; };
  EXPECT_TRUE(same());
  const bool mapped_huge = store->map_huge_pages();
  const size_t huge = store->huge_page_bytes();
  EXPECT_EQ(mapped_huge, huge >= (size_t(7) << 20) / 2);  // 7/8 of the 4 MiB of whole blocks of a 5 MiB file
  EXPECT_EQ(huge % (size_t(2) << 20), 0u);
  EXPECT_LE(huge, size_t(4) << 20);
  EXPECT_TRUE(same()) << "after reading the file again into huge pages";
  store->release_pages(w);
  EXPECT_TRUE(same()) << "after releasing the tensor's pages";
}

TEST(TensorStore, DirectoryErrors) {
  TempDir dir;
  EXPECT_EQ(open_dir_error(dir.str()), dir.str() + ": no model.safetensors or model.safetensors.index.json");
  EXPECT_EQ(open_dir_error(dir.file("absent")), dir.file("absent") + ": no such checkpoint directory");
  write_bytes(dir.file("plain"), "x");
  EXPECT_THAT(open_dir_error(dir.file("plain")), HasSubstr("not a directory"));
  // A corrupt single file is reported by its own path.
  write_bytes(dir.file("model.safetensors"), "short");
  EXPECT_THAT(open_dir_error(dir.str()), HasSubstr(dir.file("model.safetensors") + ": not a safetensors file"));
}

TEST(TensorStore, MissingShardFile) {
  TempDir dir;
  write_sharded(dir, {{"a", "s1.safetensors"}, {"b", "gone.safetensors"}});
  const std::string msg = open_dir_error(dir.str());
  EXPECT_THAT(msg, HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(msg, HasSubstr("shard gone.safetensors (holding b) does not exist"));
}

TEST(TensorStore, TensorListedButAbsentFromShard) {
  TempDir dir;
  write_sharded(dir, {{"a", "s1.safetensors"}, {"x", "s2.safetensors"}});
  const std::string msg = open_dir_error(dir.str());
  EXPECT_THAT(msg, HasSubstr(dir.file("s2.safetensors")));
  EXPECT_THAT(msg, HasSubstr("tensor x listed in the index is missing from this shard"));
  // Listed in the wrong shard: same error.
  write_sharded(dir, {{"a", "s2.safetensors"}});
  EXPECT_THAT(open_dir_error(dir.str()), HasSubstr("tensor a listed in the index is missing"));
}

TEST(TensorStore, DuplicateTensorAcrossShards) {
  TempDir dir;
  const std::vector<float> v = {1, 2, 3, 4};
  write_sharded(dir, kFullMap);
  monet::write_safetensors(dir.file("s2.safetensors"),
                           {{"a", DType::F32, {4}, v.data()}, {"b", DType::F32, {2, 2}, v.data()}});
  const std::string msg = open_dir_error(dir.str());
  EXPECT_THAT(msg, HasSubstr("tensor a appears in both"));
  EXPECT_THAT(msg, HasSubstr("s1.safetensors"));
  EXPECT_THAT(msg, HasSubstr("s2.safetensors"));
}

TEST(TensorStore, CorruptShardNamedByPath) {
  TempDir dir;
  write_sharded(dir, kFullMap);
  fs::resize_file(dir.file("s2.safetensors"), fs::file_size(dir.file("s2.safetensors")) - 4);
  const std::string msg = open_dir_error(dir.str());
  EXPECT_THAT(msg, HasSubstr(dir.file("s2.safetensors")));
  EXPECT_THAT(msg, HasSubstr("truncated: tensor b"));
}

TEST(TensorStore, BadIndexFile) {
  TempDir dir;
  write_sharded(dir, kFullMap);
  const std::string index = dir.file("model.safetensors.index.json");
  const struct {
    const char* text;
    const char* phrase;
  } cases[] = {
      {"{oops", "not valid JSON"},
      {"[]", "missing object \"weight_map\""},
      {R"({"metadata": {}})", "missing object \"weight_map\""},
      {R"({"weight_map": ["s1.safetensors"]})", "missing object \"weight_map\""},
      {R"({"weight_map": {"a": 1}})", "weight_map[\"a\"] must be a file name"},
      {R"({"weight_map": {"a": "../s1.safetensors"}})", "must name a file in the directory"},
      {R"({"weight_map": {"a": ".."}})", "must name a file in the directory"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    write_bytes(index, c.text);
    const std::string msg = open_dir_error(dir.str());
    EXPECT_THAT(msg, HasSubstr(index));
    EXPECT_THAT(msg, HasSubstr(c.phrase));
  }
}

// ---- atomic writing ------------------------------------------------------------

// Lowers the file-size limit so that writes past `bytes` fail with EFBIG
// (SIGXFSZ ignored), restoring both on scope exit: an honest mid-write failure.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &old_);
    old_handler_ = signal(SIGXFSZ, SIG_IGN);
    rlimit lowered = old_;
    lowered.rlim_cur = bytes;
    ok_ = setrlimit(RLIMIT_FSIZE, &lowered) == 0;
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &old_);
    signal(SIGXFSZ, old_handler_);
  }
  bool ok() const { return ok_; }

 private:
  rlimit old_{};
  sighandler_t old_handler_ = SIG_DFL;
  bool ok_ = false;
};

TEST(AtomicWrite, NonexistentDirectoryLeavesNothing) {
  TempDir dir;
  const std::vector<float> v = {1, 2};
  const std::string bad = dir.file("no/such/dir/x.safetensors");
  const std::string msg = error_of([&] { monet::write_safetensors(bad, {{"v", DType::F32, {2}, v.data()}}); });
  EXPECT_THAT(msg, HasSubstr(bad));
  EXPECT_THAT(msg, HasSubstr("cannot create"));
  EXPECT_THAT(error_of([&] { monet::write_file_atomic(bad, "text"); }), HasSubstr(bad));
  EXPECT_FALSE(fs::exists(dir.path() / "no"));
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(AtomicWrite, FailedWriteKeepsOldFileAndRemovesTemp) {
  TempDir dir;
  const std::string path = dir.file("keep.safetensors");
  const std::vector<float> small = {1, 2};
  monet::write_safetensors(path, {{"v", DType::F32, {2}, small.data()}});
  const std::string before = read_bytes(path);

  // The disk "fills up" in the middle of the data section.
  const std::vector<float> big(1 << 16, 3.0f);
  {
    FileSizeLimit limit(4096);
    ASSERT_TRUE(limit.ok());
    const std::string msg = error_of([&] {
      monet::write_safetensors(path, {{"v", DType::F32, {int64_t(big.size())}, big.data()}});
    });
    EXPECT_THAT(msg, HasSubstr(path));
    EXPECT_THAT(msg, HasSubstr("write failed"));
    EXPECT_THAT(error_of([&] { monet::write_file_atomic(path, std::string(10000, 'x')); }), HasSubstr("write failed"));
  }
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(temp_files(dir.path()), std::vector<std::string>{});

  // Rejected before anything is written: no data, duplicate or reserved names,
  // negative or overflowing shapes.
  const std::vector<std::vector<monet::TensorToWrite>> rejected = {
      {{"v", DType::F32, {2}, nullptr}},
      {{"v", DType::F32, {2}, small.data()}, {"v", DType::F32, {2}, small.data()}},
      {{"__metadata__", DType::F32, {2}, small.data()}},
      {{"v", DType::F32, {-2}, small.data()}},
      {{"v", DType::F32, {int64_t(1) << 40, int64_t(1) << 40}, small.data()}},
  };
  for (const auto& tensors : rejected) {
    EXPECT_THAT(error_of([&] { monet::write_safetensors(path, tensors); }), HasSubstr(path));
  }
  EXPECT_THAT(error_of([&] { monet::write_safetensors(path, {}, {{"k", "\xff not utf-8"}}); }),
              HasSubstr("cannot encode the header"));
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(temp_files(dir.path()), std::vector<std::string>{});
}

TEST(AtomicWrite, FailedRenameRemovesTemp) {
  TempDir dir;
  // The destination is a directory: the temp file is written, the rename fails.
  const std::string path = dir.file("target");
  fs::create_directory(path);
  write_bytes(dir.file("target/inside"), "kept");
  EXPECT_THAT(error_of([&] { monet::write_file_atomic(path, "contents"); }), HasSubstr("rename failed"));
  const std::vector<float> v = {1};
  EXPECT_THAT(error_of([&] { monet::write_safetensors(path, {{"v", DType::F32, {1}, v.data()}}); }),
              HasSubstr(path + ": rename failed"));
  EXPECT_EQ(read_bytes(dir.file("target/inside")), "kept");
  EXPECT_EQ(temp_files(dir.path()), std::vector<std::string>{});
}

TEST(AtomicWrite, WriteFileAtomicReplaces) {
  TempDir dir;
  const std::string path = dir.file("out.json");
  monet::write_file_atomic(path, "first");
  monet::write_file_atomic(path, std::string("second\0binary", 13));
  EXPECT_EQ(read_bytes(path), std::string("second\0binary", 13));
  monet::write_file_atomic(path, "");
  EXPECT_EQ(fs::file_size(path), 0u);
  EXPECT_EQ(temp_files(dir.path()), std::vector<std::string>{});
}

TEST(ReadFile, ContentsAndErrors) {
  TempDir dir;
  write_bytes(dir.file("f"), std::string("a\0b", 3));
  EXPECT_EQ(monet::read_file(dir.file("f")), std::string("a\0b", 3));
  EXPECT_THAT(error_of([&] { monet::read_file(dir.file("missing")); }),
              HasSubstr(dir.file("missing") + ": cannot open (No such file"));
  EXPECT_THAT(error_of([&] { monet::read_file(dir.str()); }), HasSubstr(dir.str() + ": cannot open (is a directory)"));
}

// ---- dtypes ------------------------------------------------------------------

TEST(DType, Table) {
  const struct {
    DType type;
    const char* name;
    size_t size;
  } all[] = {{DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
             {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2}, {DType::I8, "I8", 1},
             {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1}};
  for (const auto& d : all) {
    EXPECT_EQ(monet::dtype_size(d.type), d.size) << d.name;
    EXPECT_STREQ(monet::dtype_name(d.type), d.name);
    DType parsed = DType::F64;
    ASSERT_TRUE(monet::dtype_from_name(d.name, &parsed)) << d.name;
    EXPECT_EQ(parsed, d.type);
  }
  DType untouched = DType::I8;
  for (const char* name : {"Q4", "f32", "F8_E4M3", "", "F32 "}) EXPECT_FALSE(monet::dtype_from_name(name, &untouched)) << name;
  EXPECT_EQ(untouched, DType::I8);
}

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(DType, Bfloat16) {
  EXPECT_EQ(monet::f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(monet::f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(monet::f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(monet::f32_to_bf16(-0.0f), 0x8000);
  // Round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
  EXPECT_EQ(monet::f32_to_bf16(1.00390625f), 0x3f80);
  EXPECT_EQ(monet::f32_to_bf16(1.01171875f), 0x3f82);  // 1 + 3*2^-8: halfway, up to even
  EXPECT_EQ(monet::f32_to_bf16(float_of(0x3f808001)), 0x3f81);  // just above halfway
  EXPECT_EQ(monet::f32_to_bf16(float_of(0x3fffffff)), 0x4000);  // carries into the exponent
  EXPECT_EQ(monet::f32_to_bf16(float_of(0x7f7fffff)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_EQ(monet::f32_to_bf16(INFINITY), 0x7f80);
  EXPECT_EQ(monet::f32_to_bf16(-INFINITY), 0xff80);
  EXPECT_EQ(monet::f32_to_bf16(float_of(0x00000001)), 0x0000);  // tiny subnormal
  const uint16_t nan = monet::f32_to_bf16(float_of(0x7f800001));  // NaN whose payload is in the dropped bits
  EXPECT_EQ(nan & 0x7f80, 0x7f80);
  EXPECT_NE(nan & 0x7f, 0) << "NaN must stay NaN, not become inf";
  EXPECT_EQ(monet::bf16_to_f32(0x3fc0), 1.5f);
  EXPECT_EQ(monet::bf16_to_f32(0xc2f7), -123.5f);
  for (uint32_t h = 0; h < 0x10000; h++) {  // every non-NaN bfloat16 round-trips
    if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue;
    ASSERT_EQ(monet::f32_to_bf16(monet::bf16_to_f32(uint16_t(h))), h) << h;
  }
}

TEST(DType, Half) {
  EXPECT_EQ(monet::f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(monet::f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(monet::f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(monet::f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(monet::f32_to_f16(65504.0f), 0x7bff);      // largest finite
  EXPECT_EQ(monet::f32_to_f16(65519.996f), 0x7bff);    // just below the halfway point to 65536
  EXPECT_EQ(monet::f32_to_f16(65520.0f), 0x7c00);      // halfway: rounds to even, which is inf
  EXPECT_EQ(monet::f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(monet::f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(monet::f32_to_f16(INFINITY), 0x7c00);
  EXPECT_EQ(monet::f32_to_f16(-INFINITY), 0xfc00);
  // Round to nearest even between normals: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
  EXPECT_EQ(monet::f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(monet::f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(monet::f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
  EXPECT_EQ(monet::f32_to_f16(2047.0f / 1024), 0x3fff);
  EXPECT_EQ(monet::f32_to_f16(4095.0f / 2048), 0x4000);  // rounds up into the next binade
  // Subnormals: multiples of 2^-24, ties to even.
  EXPECT_EQ(monet::f32_to_f16(0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(monet::f32_to_f16(-0x1p-24f), 0x8001);
  EXPECT_EQ(monet::f32_to_f16(0x1p-25f), 0x0000);  // halfway to 0: even
  EXPECT_EQ(monet::f32_to_f16(0x1.000002p-25f), 0x0001);  // just above halfway
  EXPECT_EQ(monet::f32_to_f16(3 * 0x1p-25f), 0x0002);     // halfway 1..2: even
  EXPECT_EQ(monet::f32_to_f16(5 * 0x1p-25f), 0x0002);     // halfway 2..3: even
  EXPECT_EQ(monet::f32_to_f16(0x1p-26f), 0x0000);
  EXPECT_EQ(monet::f32_to_f16(float_of(1)), 0x0000);      // float subnormal
  EXPECT_EQ(monet::f32_to_f16(1023 * 0x1p-24f), 0x03ff);  // largest subnormal
  EXPECT_EQ(monet::f32_to_f16(1023.5f * 0x1p-24f), 0x0400);  // rounds up to the smallest normal
  EXPECT_EQ(monet::f32_to_f16(0x1p-14f), 0x0400);
  EXPECT_EQ(monet::f16_to_f32(0x0001), 0x1p-24f);
  EXPECT_EQ(monet::f16_to_f32(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(monet::f16_to_f32(0x8001), -0x1p-24f);
  EXPECT_EQ(bits_of(monet::f16_to_f32(0x8000)), 0x80000000u);
  EXPECT_EQ(monet::f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_EQ(monet::f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(monet::f16_to_f32(0x7c00), INFINITY);
  EXPECT_EQ(monet::f16_to_f32(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(0x7c01)));
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(monet::f32_to_f16(NAN))));
  EXPECT_TRUE(std::isnan(monet::f16_to_f32(monet::f32_to_f16(float_of(0x7f800001)))));  // payload only in low bits
  EXPECT_EQ(monet::f32_to_f16(-NAN) & 0x8000, 0x8000);
  for (uint32_t h = 0; h < 0x10000; h++) {  // every non-NaN half round-trips, both signs
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
    ASSERT_EQ(monet::f32_to_f16(monet::f16_to_f32(uint16_t(h))), h) << h;
  }
}

#ifdef __FLT16_MAX__
// The compiler's own _Float16 conversion (IEEE round to nearest even) as the
// reference, on a stride through all 2^32 float bit patterns.
TEST(DType, HalfMatchesCompilerFloat16) {
  for (uint64_t i = 0; i <= 0xffffffffull; i += 4093) {
    const float f = float_of(uint32_t(i));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &h, 2);
    ASSERT_EQ(monet::f32_to_f16(f), expected) << std::hex << i;
    ASSERT_EQ(bits_of(monet::f16_to_f32(expected)), bits_of(static_cast<float>(h))) << std::hex << expected;
  }
}
#endif

}  // namespace
