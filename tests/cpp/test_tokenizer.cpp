// Tokenizer unit tests on a small hand-made tokenizer.json.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "monet/error.h"
#include "monet/tokenizer.h"

namespace fs = std::filesystem;

namespace {

// Vocabulary: specials, the 256 byte tokens, a few characters and merges.
fs::path write_tokenizer(const std::string& name, bool with_config = true) {
  const fs::path dir = fs::temp_directory_path() / ("monet_tok_" + std::to_string(::getpid()) + "_" + name);
  fs::create_directories(dir);
  nlohmann::json vocab = nlohmann::json::object();
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  char buf[8];
  for (int b = 0; b < 256; b++) {
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    pieces.push_back(buf);
  }
  for (const char* p : {"\xe2\x96\x81", "h", "e", "l", "o", "w", "r", "d", "\xe2\x96\x81h", "he", "ll", "\xe2\x96\x81he",
                        "llo", "\xe2\x96\x81hello", "<tag>"})
    pieces.push_back(p);
  for (size_t i = 0; i < pieces.size(); i++) vocab[pieces[i]] = i;
  nlohmann::json tok = {
      {"added_tokens",
       {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
        {{"id", 1}, {"content", "<s>"}, {"special", true}},
        {{"id", 2}, {"content", "</s>"}, {"special", true}},
        {{"id", int(pieces.size()) - 1}, {"content", "<tag>"}, {"special", false}}}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "\xe2\x96\x81"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xe2\x96\x81"}}}}}},
      {"pre_tokenizer", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "\xe2\x96\x81"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"byte_fallback", true},
        {"fuse_unk", true},
        {"vocab", vocab},
        {"merges", {"\xe2\x96\x81 h", "h e", "l l", "\xe2\x96\x81h e", "ll o", "\xe2\x96\x81he llo"}}}}};
  std::ofstream(dir / "tokenizer.json") << tok.dump();
  if (with_config) std::ofstream(dir / "tokenizer_config.json") << R"({"add_bos_token": true, "add_eos_token": true})";
  return dir;
}

int32_t id_of(const monet::Tokenizer& t, const std::string& p) { return t.token_id(p); }

TEST(Tokenizer, BpeMergesByRank) {
  auto t = monet::Tokenizer::load_dir(write_tokenizer("bpe").string());
  // "hello" -> ▁hello (all merges apply); "hell" -> ▁he + ll
  EXPECT_EQ(t->encode("hello", false), (std::vector<int32_t>{id_of(*t, "\xe2\x96\x81hello")}));
  EXPECT_EQ(t->encode("hell", false), (std::vector<int32_t>{id_of(*t, "\xe2\x96\x81he"), id_of(*t, "ll")}));
  EXPECT_EQ(t->encode("", false), (std::vector<int32_t>{}));
}

TEST(Tokenizer, ByteFallbackAndSpecialFlags) {
  auto t = monet::Tokenizer::load_dir(write_tokenizer("bytes").string());
  // 'z' is not in the vocabulary: its byte token; "é" is two bytes
  const std::vector<int32_t> ids = t->encode("hez\xc3\xa9", true);
  const std::vector<int32_t> want = {1, id_of(*t, "\xe2\x96\x81he"), 3 + 'z', 3 + 0xc3, 3 + 0xa9, 2};
  EXPECT_EQ(ids, want);  // BOS and EOS from tokenizer_config.json
  EXPECT_EQ(t->decode(ids), "hez\xc3\xa9");
  EXPECT_EQ(t->decode(ids, false), "<s> hez\xc3\xa9</s>");  // as HF: the Strip decoder sees "<s>" first
}

TEST(Tokenizer, AddedTokensSplitTheText) {
  auto t = monet::Tokenizer::load_dir(write_tokenizer("added").string());
  const int32_t tag = id_of(*t, "<tag>");
  const std::vector<int32_t> ids = t->encode("hello<tag>hello", false);
  const int32_t hello = id_of(*t, "\xe2\x96\x81hello");
  // each segment is normalised on its own (the legacy LLaMA behaviour): ▁ before both
  EXPECT_EQ(ids, (std::vector<int32_t>{hello, tag, hello}));
  EXPECT_EQ(t->decode(ids), "hello<tag> hello");
}

TEST(Tokenizer, StreamingHoldsBackSplitCharacters) {
  auto t = monet::Tokenizer::load_dir(write_tokenizer("stream").string());
  // "é€" = c3 a9 | e2 82 ac, all byte tokens
  const std::vector<int32_t> ids = t->encode("h\xc3\xa9\xe2\x82\xac o", false);
  monet::StreamDecoder s(*t);
  std::vector<std::string> pieces;
  std::string all;
  for (int32_t id : ids) {
    pieces.push_back(s.feed(id));
    all += pieces.back();
  }
  all += s.flush();
  EXPECT_EQ(all, t->decode(ids));
  // no piece ever ends inside a multi-byte character
  for (const std::string& p : pieces)
    if (!p.empty()) {
      unsigned char last = static_cast<unsigned char>(p.back());
      EXPECT_TRUE(last < 0x80 || (last & 0xc0) == 0x80) << p;
    }
  // the piece fed with 0xc3 alone emits nothing yet
  monet::StreamDecoder s2(*t);
  EXPECT_EQ(s2.feed(3 + 0xc3), "");
  EXPECT_EQ(s2.feed(3 + 0xa9), "\xc3\xa9");
  // an invalid byte is replaced, not held forever
  EXPECT_EQ(s2.feed(3 + 0xff), "\xef\xbf\xbd");
}

TEST(Tokenizer, Errors) {
  const fs::path dir = write_tokenizer("errors", false);
  std::ofstream(dir / "tokenizer.json") << R"({"model": {"type": "Unigram", "vocab": []}})";
  try {
    monet::Tokenizer::load_dir(dir.string());
    FAIL();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("Unigram"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("tokenizer.json"));
  }
  fs::remove(dir / "tokenizer.json");
  std::ofstream(dir / "tokenizer.model") << "not a protobuf";
  EXPECT_THROW(monet::Tokenizer::load_dir(dir.string()), monet::Error);
  fs::remove(dir / "tokenizer.model");
  try {
    monet::Tokenizer::load_dir(dir.string());
    FAIL();
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("no tokenizer.json or tokenizer.model"));
  }
}

}  // namespace
