// Tokenizer unit tests: hand-made tokenizer.json and SentencePiece models
// (BPE merge order, byte fallback, added/special tokens, normalisation
// layouts, decoding rules, streaming), the real SentencePiece models in
// tests/data/tokenizers, and load errors. Expected ids of the hand-made
// models were checked with HF `tokenizers` 0.22 and `sentencepiece` 0.2.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <limits>
#include <random>

#include "monet/error.h"
#include "monet/tokenizer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;
using Ids = std::vector<int32_t>;

namespace {

const std::string kMark = "\xe2\x96\x81";  // ▁

class TokDir {
 public:
  TokDir() {
    path_ = fs::temp_directory_path() / ("monet_tok_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TokDir() { fs::remove_all(path_); }
  TokDir(const TokDir&) = delete;
  TokDir& operator=(const TokDir&) = delete;
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }
  std::string str() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

json added_token(int id, const std::string& content, bool special, bool normalized = false, bool lstrip = false,
                 bool rstrip = false, bool single_word = false) {
  return {{"id", id},         {"content", content}, {"single_word", single_word}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}};
}

// A LLaMA-style tokenizer.json: <unk> <s> </s>, the 256 byte tokens, a few
// characters and merges. layout "classic": Prepend/Replace normalizer and
// Strip decoder; "metaspace": Metaspace pre-tokenizer and decoder.
struct ToyOptions {
  std::string layout = "classic";
  std::string prepend_scheme = "first";
  bool split = false;
  bool byte_fallback = true;
  bool merges_as_pairs = false;
  std::vector<json> extra_added;  // added_tokens beyond <unk> <s> </s>
};

std::vector<std::string> toy_pieces() {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  char buf[16];
  for (int b = 0; b < 256; b++) {
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    pieces.push_back(buf);
  }
  for (const std::string& p : {kMark, std::string("h"), std::string("e"), std::string("l"), std::string("o"),
                              kMark + "h", std::string("he"), std::string("ll"), kMark + "he", std::string("llo"),
                              kMark + "hello", std::string("hello")})
    pieces.push_back(p);
  return pieces;
}

json toy_json(const ToyOptions& o = {}) {
  const std::vector<std::string> pieces = toy_pieces();
  json vocab = json::object();
  for (size_t i = 0; i < pieces.size(); i++) vocab[pieces[i]] = i;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {kMark, "h"}, {"h", "e"}, {"l", "l"}, {kMark + "h", "e"}, {"ll", "o"}, {kMark + "he", "llo"}, {"he", "llo"}};
  json merge_list = json::array();
  for (const auto& [a, b] : merges) merge_list.push_back(o.merges_as_pairs ? json::array({a, b}) : json(a + " " + b));
  json added = {added_token(0, "<unk>", true), added_token(1, "<s>", true), added_token(2, "</s>", true)};
  for (const json& a : o.extra_added) added.push_back(a);
  json tok = {{"version", "1.0"},
              {"added_tokens", added},
              {"post_processor", nullptr},
              {"model",
               {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", "<unk>"},
                {"fuse_unk", true},
                {"byte_fallback", o.byte_fallback},
                {"vocab", vocab},
                {"merges", merge_list}}}};
  if (o.layout == "classic") {
    tok["normalizer"] = {{"type", "Sequence"},
                         {"normalizers",
                          {{{"type", "Prepend"}, {"prepend", kMark}},
                           {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMark}}}}};
    tok["pre_tokenizer"] = nullptr;
    tok["decoder"] = {{"type", "Sequence"},
                      {"decoders",
                       {{{"type", "Replace"}, {"pattern", {{"String", kMark}}}, {"content", " "}},
                        {{"type", "ByteFallback"}},
                        {{"type", "Fuse"}},
                        {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  } else {
    tok["normalizer"] = nullptr;
    tok["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", kMark}, {"prepend_scheme", o.prepend_scheme}, {"split", o.split}};
    tok["decoder"] = {{"type", "Sequence"},
                      {"decoders",
                       {{{"type", "Metaspace"}, {"replacement", kMark}, {"prepend_scheme", o.prepend_scheme}, {"split", o.split}},
                        {{"type", "ByteFallback"}},
                        {{"type", "Fuse"}}}}};
  }
  return tok;
}

const char* kLlamaConfig = R"({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": true, "add_eos_token": false})";

std::unique_ptr<monet::Tokenizer> load_toy(const TokDir& dir, const ToyOptions& o = {}, const char* config = kLlamaConfig) {
  dir.write("tokenizer.json", toy_json(o).dump());
  if (config) dir.write("tokenizer_config.json", config);
  return monet::Tokenizer::load_dir(dir.str());
}

int32_t byte_id(int b) { return 3 + b; }  // ids of the toy's <0xNN> tokens

// --- a small protobuf writer for hand-made SentencePiece models ---
std::string varint(uint64_t v) {
  std::string s;
  do {
    uint8_t b = v & 0x7f;
    v >>= 7;
    s += char(v ? b | 0x80 : b);
  } while (v);
  return s;
}
std::string field_varint(int field, uint64_t v) { return varint(uint64_t(field) << 3) + varint(v); }
std::string field_bytes(int field, const std::string& b) { return varint((uint64_t(field) << 3) | 2) + varint(b.size()) + b; }
std::string field_float(int field, float f) {
  std::string s = varint((uint64_t(field) << 3) | 5);
  s.append(reinterpret_cast<const char*>(&f), 4);
  return s;
}

struct SpPiece {
  std::string piece;
  float score;
  int type;  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
};

// <unk> <s> </s> (ids 0-2), bytes (3-258), then `pieces` from id 259.
std::string sp_model(const std::vector<SpPiece>& pieces, int model_type = 2) {
  std::vector<SpPiece> all = {{"<unk>", 0, 2}, {"<s>", 0, 3}, {"</s>", 0, 3}};
  char buf[16];
  for (int b = 0; b < 256; b++) {
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    all.push_back({buf, 0, 6});
  }
  all.insert(all.end(), pieces.begin(), pieces.end());
  std::string out;
  for (const SpPiece& p : all)
    out += field_bytes(1, field_bytes(1, p.piece) + field_float(2, p.score) + field_varint(3, uint64_t(p.type)));
  out += field_bytes(2, field_varint(3, uint64_t(model_type)) + field_varint(35, 1));
  out += field_bytes(3, field_bytes(1, "identity") + field_varint(3, 1) + field_varint(4, 0) + field_varint(5, 1));
  return out;
}

// Pieces from id 259: ▁ a b c ab bc ▁a x y xy(unused) xyx [U](user defined).
const std::vector<SpPiece> kTinySp = {{kMark, -1, 1}, {"a", -2, 1},  {"b", -3, 1},    {"c", -4, 1},
                                      {"ab", -5, 1},  {"bc", -6, 1}, {kMark + "a", -7, 1}, {"x", -8, 1},
                                      {"y", -9, 1},   {"xy", -10, 5}, {"xyx", -11, 1}, {"[U]", 0, 4}};

fs::path data_dir() { return fs::path(__FILE__).parent_path().parent_path() / "data" / "tokenizers"; }

std::unique_ptr<monet::Tokenizer> load_real(const TokDir& dir, const std::string& name, const char* config = nullptr) {
  fs::copy_file(data_dir() / name, fs::path(dir.str()) / "tokenizer.model");
  if (config) dir.write("tokenizer_config.json", config);
  return monet::Tokenizer::load_dir(dir.str());
}

bool valid_utf8_pieces(const std::string& s) {
  // no character cut in two at either end
  if (s.empty()) return true;
  const unsigned char first = static_cast<unsigned char>(s.front());
  if ((first & 0xc0) == 0x80) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xc0) == 0x80) i--;
  const unsigned char lead = static_cast<unsigned char>(s[i]);
  const size_t need = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
  return s.size() - i == need;
}

// Streaming every prefix gives decode(all): checked on random id sequences.
void expect_stream_equals_decode(const monet::Tokenizer& t, uint32_t seed, int vocab_limit) {
  std::mt19937 rng(seed);
  for (int round = 0; round < 300; round++) {
    Ids ids(rng() % 12 + 1);
    for (int32_t& id : ids) id = int32_t(rng() % 2 ? rng() % uint32_t(vocab_limit) : rng() % 300);
    for (bool skip : {true, false}) {
      monet::StreamDecoder s(t, skip);
      std::string all;
      for (int32_t id : ids) {
        const std::string piece = s.feed(id);
        EXPECT_TRUE(valid_utf8_pieces(piece)) << piece;
        all += piece;
      }
      all += s.flush();
      ASSERT_EQ(all, t.decode(ids, skip)) << "seed " << seed << " round " << round;
    }
  }
}

// ---------------------------------------------------------------------------

TEST(Tokenizer, BpeMergesByRank) {
  TokDir dir;
  auto t = load_toy(dir);
  EXPECT_EQ(t->encode("hello", false), Ids{t->token_id(kMark + "hello")});
  // ▁ h e l l: "▁ h" (rank 0) then "l l" (rank 2) before "▁h e" (rank 3)
  EXPECT_EQ(t->encode("hell", false), (Ids{t->token_id(kMark + "he"), t->token_id("ll")}));
  EXPECT_EQ(t->encode("", false), Ids{});
  EXPECT_EQ(t->encode("", true), Ids{1});  // BOS only, as HF
  // merges written as [a, b] pairs: the same tokenizer
  TokDir dir2;
  ToyOptions pairs;
  pairs.merges_as_pairs = true;
  auto t2 = load_toy(dir2, pairs);
  for (const char* text : {"hello", "hell", "hello hello", "oh hello llo"}) EXPECT_EQ(t2->encode(text), t->encode(text)) << text;
}

TEST(Tokenizer, LowerRankWinsOverPosition) {
  // a b c with merges "b c" (rank 0) before "a b" (rank 1): a + bc, although "a b" is leftmost
  json tok = {{"model",
               {{"type", "BPE"},
                {"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}}},
                {"merges", {"b c", "a b"}}}}};
  TokDir dir;
  dir.write("tokenizer.json", tok.dump());
  auto t = monet::Tokenizer::load_dir(dir.str());
  EXPECT_EQ(t->encode("abc", false), (Ids{0, 4}));
  tok["model"]["merges"] = {"a b", "b c"};
  dir.write("tokenizer.json", tok.dump());
  EXPECT_EQ(monet::Tokenizer::load_dir(dir.str())->encode("abc", false), (Ids{3, 2}));
  // equal ranks cannot happen; ties between equal pairs go leftmost: "bcbc" -> bc bc
  EXPECT_EQ(monet::Tokenizer::load_dir(dir.str())->encode("bcbc", false), (Ids{4, 4}));
}

TEST(Tokenizer, ByteFallbackAndUnknown) {
  TokDir dir;
  auto t = load_toy(dir, {}, R"({"add_bos_token": true, "add_eos_token": true})");
  // 'z' is not in the vocabulary: its byte token; "é" is two bytes
  const Ids ids = t->encode("hez\xc3\xa9", true);
  EXPECT_EQ(ids, (Ids{1, t->token_id(kMark + "he"), byte_id('z'), byte_id(0xc3), byte_id(0xa9), 2}));
  EXPECT_EQ(t->decode(ids), "hez\xc3\xa9");
  EXPECT_EQ(t->decode(ids, false), "<s> hez\xc3\xa9</s>");  // as HF: the Strip decoder sees "<s>" first
  // without byte fallback: unk, consecutive unknown characters fused into one
  TokDir dir2;
  ToyOptions no_bytes;
  no_bytes.byte_fallback = false;
  auto t2 = load_toy(dir2, no_bytes);
  EXPECT_EQ(t2->encode("hezz\xc3\xa9h", false), (Ids{t2->token_id(kMark + "he"), 0, t2->token_id("h")}));
}

TEST(Tokenizer, SpecialTokensInTextAreMatchedFirst) {
  TokDir dir;
  auto t = load_toy(dir);
  const int32_t hello = t->token_id(kMark + "hello");
  // each stretch between special tokens is normalised on its own (legacy LLaMA): ▁ before both
  EXPECT_EQ(t->encode("hello<s>hello</s>", false), (Ids{hello, 1, hello, 2}));
  EXPECT_EQ(t->encode("<s>", true), (Ids{1, 1}));
  EXPECT_EQ(t->decode({1, hello, 1, hello, 2}), "hello hello");
  EXPECT_EQ(t->decode({1, hello, 1, hello, 2}, false), "<s> hello<s> hello</s>");
  // leftmost-longest: "<s>" inside "</s>" is not matched
  EXPECT_EQ(t->encode("</s>", false), Ids{2});
}

TEST(Tokenizer, AddedTokenOptions) {
  ToyOptions o;
  const int base = int(toy_pieces().size());
  o.extra_added = {added_token(base, "<|x|>", true, false, /*lstrip=*/true, /*rstrip=*/true),
                   added_token(base + 1, "<pad>", false, /*normalized=*/true),
                   added_token(base + 2, "qz", false, false, false, false, /*single_word=*/true)};
  TokDir dir;
  auto t = load_toy(dir, o);
  const int32_t x = base, pad = base + 1, qz = base + 2;
  const int32_t hello = t->token_id(kMark + "hello");
  // lstrip/rstrip take the white space (Unicode too: U+3000, U+00A0) beside the token
  EXPECT_EQ(t->encode("hello  <|x|>  hello", false), (Ids{hello, x, hello}));
  EXPECT_EQ(t->encode("hello\xe3\x80\x80<|x|>\xc2\xa0hello", false), (Ids{hello, x, hello}));
  // a normalized token is matched in the normalised text, against its
  // normalised form "▁<pad>": after a space only (as HF)
  EXPECT_EQ(t->encode("hello <pad> hello", false), (Ids{hello, pad, hello}));
  const Ids glued = t->encode("hello<pad>hello", false);
  EXPECT_EQ(std::count(glued.begin(), glued.end(), pad), 0);
  EXPECT_EQ(t->encode("<pad>hello", false), (Ids{pad, t->token_id("hello")}));
  // single_word: only where no word character touches it
  EXPECT_EQ(t->encode("qz", false), Ids{qz});
  EXPECT_EQ(t->encode("(qz)", false).at(2), qz);
  for (const char* text : {"aqz", "qza", "qz_", "\xc3\xa9qz"}) {
    const Ids ids = t->encode(text, false);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), qz), 0) << text;
  }
  // non-special added tokens stay in decoded text; special ones are skipped
  EXPECT_EQ(t->decode({hello, x, pad, hello}), "hello<pad> hello");
}

TEST(Tokenizer, MetaspaceLayout) {
  TokDir dir;
  ToyOptions first;
  first.layout = "metaspace";
  auto t = load_toy(dir, first);
  const int32_t hello = t->token_id(kMark + "hello"), hello_bare = t->token_id("hello");
  EXPECT_EQ(t->encode("hello", false), Ids{hello});
  // prepend_scheme "first": no ▁ for text that follows a special token
  EXPECT_EQ(t->encode("<s>hello", false), (Ids{1, hello_bare}));
  EXPECT_EQ(t->encode("hello hello", false), (Ids{hello, hello}));
  EXPECT_EQ(t->decode({hello, hello}), "hello hello");
  // the Metaspace decoder drops every ▁ of the first token only
  EXPECT_EQ(t->decode({t->token_id(kMark), hello}), " hello");
  EXPECT_EQ(t->decode({hello_bare, hello}), "hello hello");

  TokDir dir2;
  ToyOptions always;
  always.layout = "metaspace";
  always.prepend_scheme = "always";
  always.split = true;
  auto t2 = load_toy(dir2, always);
  EXPECT_EQ(t2->encode("<s>hello", false), (Ids{1, hello}));
  // split: words begin at each ▁, so "▁hello▁hello" is never one BPE word
  EXPECT_EQ(t2->encode("hello  hello", false), (Ids{hello, t2->token_id(kMark), hello}));
}

TEST(Tokenizer, DecodeByteRunsAsHf) {
  TokDir dir;
  auto t = load_toy(dir);
  const int32_t h = t->token_id("h");
  // a run of byte tokens is its bytes when valid UTF-8 ...
  EXPECT_EQ(t->decode({byte_id(0xc3), byte_id(0xa9), h}), "\xc3\xa9h");
  // ... else one U+FFFD per token, valid bytes in the run included (HF's ByteFallback)
  EXPECT_EQ(t->decode({byte_id('A'), byte_id(0xff), h}), "\xef\xbf\xbd\xef\xbf\xbdh");
  EXPECT_EQ(t->decode({byte_id(0xc3), h, byte_id(0xa9)}), "\xef\xbf\xbdh\xef\xbf\xbd");
  // the Strip decoder removes one leading space of the text, even from a byte
  EXPECT_EQ(t->decode({byte_id(' '), h}), "h");
  EXPECT_EQ(t->decode({t->token_id(kMark), t->token_id(kMark), h}), " h");
  // ids beyond the vocabulary decode to nothing; piece() refuses them
  EXPECT_EQ(t->decode({h, 100000, h}), "hh");
  EXPECT_THROW(t->piece(100000), monet::Error);
}

TEST(Tokenizer, StreamingHoldsBackSplitCharacters) {
  TokDir dir;
  auto t = load_toy(dir);
  const int32_t hello = t->token_id(kMark + "hello");
  monet::StreamDecoder s(*t);
  EXPECT_EQ(s.feed(hello), "hello");
  // "é" as two byte tokens: nothing until the run of byte tokens ends
  EXPECT_EQ(s.feed(byte_id(0xc3)), "");
  EXPECT_EQ(s.feed(byte_id(0xa9)), "");
  EXPECT_EQ(s.feed(hello), "\xc3\xa9 hello");
  EXPECT_EQ(s.feed(byte_id(0xe2)), "");
  EXPECT_EQ(s.feed(byte_id(0x82)), "");
  EXPECT_EQ(s.feed(byte_id(0xac)), "");
  EXPECT_EQ(s.flush(), "\xe2\x82\xac");  // the end of the ids ends the run
  // SentencePiece: bytes go out as soon as a character is complete
  TokDir sp_dir;
  sp_dir.write("tokenizer.model", sp_model(kTinySp));
  auto sp = monet::Tokenizer::load_dir(sp_dir.str());
  monet::StreamDecoder s2(*sp);
  EXPECT_EQ(s2.feed(byte_id(0xc3)), "");
  EXPECT_EQ(s2.feed(byte_id(0xa9)), "\xc3\xa9");
  EXPECT_EQ(s2.feed(byte_id(0xff)), "\xef\xbf\xbd");  // invalid: replaced, not held
  EXPECT_EQ(s2.flush(), "");
}

TEST(Tokenizer, StreamEqualsDecode) {
  for (const char* layout : {"classic", "metaspace"}) {
    TokDir dir;
    ToyOptions o;
    o.layout = layout;
    auto t = load_toy(dir, o);
    expect_stream_equals_decode(*t, 1, t->vocab_size() + 2);
  }
  TokDir sp_dir;
  sp_dir.write("tokenizer.model", sp_model(kTinySp));
  auto sp = monet::Tokenizer::load_dir(sp_dir.str());
  expect_stream_equals_decode(*sp, 2, sp->vocab_size() + 2);
  TokDir real_dir;
  auto real = load_real(real_dir, "mistral-v1.model");
  expect_stream_equals_decode(*real, 3, real->vocab_size());
}

TEST(Tokenizer, ConfigDecidesBosEos) {
  const std::string hello = kMark + "hello";
  struct Case {
    const char* config;
    bool json_template;
    Ids want;
  } cases[] = {
      {R"({"tokenizer_class": "LlamaTokenizerFast"})", false, {1, 269}},  // LLaMA defaults: BOS, no EOS
      {R"({"tokenizer_class": "LlamaTokenizer", "add_bos_token": false})", true, {269}},
      {R"({"tokenizer_class": "LlamaTokenizerFast", "add_eos_token": true})", false, {1, 269, 2}},
      {R"({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": false})", true, {2, 269, 1}},  // template wins
      {R"({"tokenizer_class": "PreTrainedTokenizerFast"})", false, {269}},
      {nullptr, true, {2, 269, 1}},
      {nullptr, false, {1, 269}},
  };
  for (const Case& c : cases) {
    TokDir dir;
    json tok = toy_json();
    if (c.json_template)  // an unusual template, to tell it from the defaults
      tok["post_processor"] = {{"type", "TemplateProcessing"},
                               {"single", {{{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}},
                                           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                           {{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}}}};
    dir.write("tokenizer.json", tok.dump());
    if (c.config) dir.write("tokenizer_config.json", c.config);
    auto t = monet::Tokenizer::load_dir(dir.str());
    ASSERT_EQ(t->token_id(hello), 269);
    EXPECT_EQ(t->encode("hello"), c.want) << (c.config ? c.config : "no config") << " template " << c.json_template;
    EXPECT_EQ(t->bos_id(), 1);
    EXPECT_EQ(t->eos_id(), 2);
  }
  // bos/eos tokens named by the config
  TokDir dir;
  auto t = load_toy(dir, {}, R"({"bos_token": {"content": "</s>"}, "eos_token": "<s>"})");
  EXPECT_EQ(t->bos_id(), 2);
  EXPECT_EQ(t->eos_id(), 1);
}

TEST(Tokenizer, SentencePieceMergesByScore) {
  TokDir dir;
  dir.write("tokenizer.model", sp_model(kTinySp));
  auto t = monet::Tokenizer::load_dir(dir.str());
  EXPECT_EQ(t->vocab_size(), 271);
  // ▁ a b c: "ab" (-5) beats "bc" (-6) and "▁a" (-7): ▁ ab c
  EXPECT_EQ(t->encode("abc", false), (Ids{259, 263, 262}));
  EXPECT_EQ(t->encode("a bc", false), (Ids{265, 259, 264}));
  // "xy" is UNUSED: formed on the way to "xyx", else split back into x y
  EXPECT_EQ(t->encode("xyx", false), (Ids{259, 269}));
  EXPECT_EQ(t->encode("xy", false), (Ids{259, 266, 267}));
  // byte fallback, spaces, BOS (no config: LLaMA defaults)
  EXPECT_EQ(t->encode("z\xc3\xa9", true), (Ids{1, 259, byte_id('z'), byte_id(0xc3), byte_id(0xa9)}));
  EXPECT_EQ(t->encode("  a", false), (Ids{259, 259, 265}));
  // control and user-defined pieces in the text are tokens, as in HF's
  // converted tokenizer (each stretch of text gets its own ▁ prefix)
  EXPECT_EQ(t->encode("[U]a</s>", false), (Ids{270, 265, 2}));
  // decoding as sentencepiece: the first piece's ▁ goes, control pieces
  // are empty, unk is " ⁇ " when special tokens are kept
  EXPECT_EQ(t->decode({1, 265, 259, 264}), "a bc");
  EXPECT_EQ(t->decode({0, 265}, false), " \xe2\x81\x87  a");
  EXPECT_EQ(t->decode({0, 265}), "a");
  EXPECT_EQ(t->decode({byte_id(' '), 265}), "  a");  // a byte piece is no dummy prefix
  EXPECT_EQ(t->decode({byte_id('A'), byte_id(0xff), 261}), "A\xef\xbf\xbd" "b");
}

TEST(Tokenizer, SentencePieceLegacyFalse) {
  TokDir dir;
  dir.write("tokenizer.model", sp_model(kTinySp));
  dir.write("tokenizer_config.json", R"({"tokenizer_class": "LlamaTokenizer", "legacy": false})");
  auto t = monet::Tokenizer::load_dir(dir.str());
  // no ▁ prefix for the text after a control token (HF's non-legacy LLaMA)
  EXPECT_EQ(t->encode("a</s>a", false), (Ids{265, 2, 260}));
  EXPECT_EQ(t->encode("abc", false), (Ids{259, 263, 262}));
}

TEST(Tokenizer, RealSentencePieceModels) {
  // ids from sentencepiece 0.2 / transformers 4.57 (LlamaTokenizerFast) on the same models
  TokDir dir;
  auto t = load_real(dir, "mistral-v1.model");
  EXPECT_EQ(t->vocab_size(), 32000);
  EXPECT_EQ(t->encode("Hello world"), (Ids{1, 22557, 1526}));
  EXPECT_EQ(t->encode("hello world", false), (Ids{6312, 28709, 1526}));
  EXPECT_EQ(t->encode("\n", false), (Ids{28705, 13}));
  EXPECT_EQ(t->encode(" \x7f" "] 3", false), (Ids{259, 30982, 28793, 28705, 28770}));
  EXPECT_EQ(t->piece(22557), kMark + "Hello");
  EXPECT_EQ(t->decode({1, 22557, 1526, 2}), "Hello world");
  TokDir dir3;
  auto t3 = load_real(dir3, "mistral-v3.model");
  EXPECT_EQ(t3->vocab_size(), 32768);
  const Ids inst = t3->encode("[INST]", false);
  EXPECT_EQ(inst, Ids{3});
  EXPECT_TRUE(t3->is_special(3));
  EXPECT_FALSE(t3->is_special(t3->token_id("[REFERENCE_DOC_1]")));
}

TEST(Tokenizer, LongInputIsFast) {
  // 200 KB without a space is one BPE word in the LLaMA layout: must not be quadratic
  std::string text;
  for (int i = 0; i < 20000; i++) text += "abcdefghi\xc3\xa9";
  TokDir dir;
  auto t = load_real(dir, "mistral-v1.model");
  TokDir toy_dir;
  auto toy = load_toy(toy_dir);
  const auto start = std::chrono::steady_clock::now();
  const Ids ids = t->encode(text, false);
  const Ids toy_ids = toy->encode(text, false);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(t->decode(ids), text);
  EXPECT_EQ(toy->decode(toy_ids), text);
  EXPECT_LT(seconds, 5.0);
}

TEST(Tokenizer, InvalidUtf8InputBecomesReplacementCharacters) {
  TokDir dir;
  auto t = load_toy(dir);
  EXPECT_EQ(t->encode("h\xff", false), t->encode("h\xef\xbf\xbd", false));
}

void expect_load_error(const TokDir& dir, const std::vector<std::string>& parts) {
  try {
    monet::Tokenizer::load_dir(dir.str());
    ADD_FAILURE() << "no error";
  } catch (const monet::Error& e) {
    for (const std::string& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

TEST(Tokenizer, Errors) {
  TokDir dir;
  expect_load_error(dir, {"no tokenizer.json or tokenizer.model"});
  dir.write("tokenizer.json", "{broken");
  expect_load_error(dir, {"tokenizer.json", "not valid JSON"});
  for (const char* type : {"Unigram", "WordPiece", "WordLevel"}) {
    dir.write("tokenizer.json", json({{"model", {{"type", type}, {"vocab", json::array()}}}}).dump());
    expect_load_error(dir, {"tokenizer.json", type, "not supported"});
  }
  json tok = toy_json();
  tok["normalizer"] = {{"type", "NFKC"}};
  dir.write("tokenizer.json", tok.dump());
  expect_load_error(dir, {"tokenizer.json", "NFKC"});
  tok = toy_json();
  tok["pre_tokenizer"] = {{"type", "ByteLevel"}};
  dir.write("tokenizer.json", tok.dump());
  expect_load_error(dir, {"tokenizer.json", "ByteLevel"});
  tok = toy_json();
  tok["model"]["merges"].push_back("h q");
  dir.write("tokenizer.json", tok.dump());
  expect_load_error(dir, {"tokenizer.json", "missing from the vocab"});
  tok = toy_json();
  tok["model"]["byte_fallback"] = "yes";
  dir.write("tokenizer.json", tok.dump());
  expect_load_error(dir, {"tokenizer.json", "model.byte_fallback", "true or false"});
  dir.write("tokenizer.json", toy_json().dump());
  dir.write("tokenizer_config.json", "[1, 2");
  expect_load_error(dir, {"tokenizer_config.json", "not valid JSON"});

  TokDir sp;
  sp.write("tokenizer.model", "not a protobuf");
  expect_load_error(sp, {"tokenizer.model"});
  sp.write("tokenizer.model", sp_model(kTinySp, /*model_type=*/1));
  expect_load_error(sp, {"tokenizer.model", "UNIGRAM", "not supported"});
  sp.write("tokenizer.model", "");
  expect_load_error(sp, {"tokenizer.model", "no pieces"});
}

// Everything a tokenizer file sets is bounded: no setting makes encoding
// loop, grow without bound or index outside the vocabulary (issue 18).
TEST(Tokenizer, SettingsAreBounded) {
  TokDir dir;
  auto expect_json_error = [&](const json& tok, const std::vector<std::string>& parts) {
    dir.write("tokenizer.json", tok.dump());
    expect_load_error(dir, parts);
  };
  ToyOptions meta;
  meta.layout = "metaspace";
  meta.split = true;
  // An empty Metaspace replacement made encoding loop forever.
  json tok = toy_json(meta);
  tok["pre_tokenizer"]["replacement"] = "";
  expect_json_error(tok, {"tokenizer.json", "pre_tokenizer Metaspace.replacement", "exactly one character"});
  tok["pre_tokenizer"]["replacement"] = "ab";
  expect_json_error(tok, {"tokenizer.json", "exactly one character"});
  tok["pre_tokenizer"]["replacement"] = 7;
  expect_json_error(tok, {"tokenizer.json", "replacement must be a string"});
  tok = toy_json(meta);
  tok["decoder"]["decoders"][0]["replacement"] = "";
  expect_json_error(tok, {"tokenizer.json", "decoder Metaspace.replacement", "exactly one character"});
  // Normalizer patterns: not empty, short, and a bounded growth of the text.
  tok = toy_json();
  tok["normalizer"]["normalizers"][1]["pattern"]["String"] = "";
  expect_json_error(tok, {"tokenizer.json", "normalizer Replace.pattern.String must not be empty"});
  tok = toy_json();
  tok["normalizer"]["normalizers"][1]["content"] = std::string(65, 'x');
  expect_json_error(tok, {"tokenizer.json", "normalizer Replace.content has 65 bytes"});
  tok = toy_json();
  for (int k = 0; k < 3; k++)
    tok["normalizer"]["normalizers"].push_back({{"type", "Replace"}, {"pattern", {{"String", "h"}}}, {"content", "hhhh"}});
  expect_json_error(tok, {"tokenizer.json", "times longer"});
  tok = toy_json();
  tok["decoder"]["decoders"][0]["pattern"]["String"] = "";
  expect_json_error(tok, {"tokenizer.json", "decoder Replace.pattern.String must not be empty"});
  // Vocabulary ids: a few entries cannot size a huge vocabulary.
  tok = toy_json();
  tok["model"]["vocab"]["zz"] = 10000000;
  expect_json_error(tok, {"tokenizer.json", "token ids run up to 10000000", "mostly unused"});
  tok = toy_json();
  tok["model"]["vocab"] = json::object();
  tok["added_tokens"] = json::array();
  tok["model"]["merges"] = json::array();
  expect_json_error(tok, {"tokenizer.json", "model.vocab is empty"});
  // Added tokens: flags are booleans.
  ToyOptions with_added;
  with_added.extra_added = {added_token(300, "[X]", false)};
  tok = toy_json(with_added);
  tok["added_tokens"][3]["special"] = "yes";
  expect_json_error(tok, {"tokenizer.json", "added_tokens[3].special must be true or false"});
  // The post-processor's ids lie in the vocabulary, and its table is checked.
  tok = toy_json();
  tok["post_processor"] = {{"type", "TemplateProcessing"},
                           {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}}}}}},
                           {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {99999}}}}}}};
  expect_json_error(tok, {"tokenizer.json", "post_processor.special_tokens[\"<s>\"].ids[0] = 99999", "not a token id"});
  tok["post_processor"]["special_tokens"]["<s>"] = {{"id", "<s>"}};  // no "ids": read past the object on main
  dir.write("tokenizer.json", tok.dump());
  EXPECT_EQ(monet::Tokenizer::load_dir(dir.str())->encode("hello", true).front(), 1);
  tok["post_processor"]["single"] = "<s>";
  expect_json_error(tok, {"tokenizer.json", "post_processor.single must be an array"});

  // A one-character replacement other than "▁" works (and ends).
  tok = toy_json(meta);
  tok["pre_tokenizer"]["replacement"] = "h";
  dir.write("tokenizer.json", tok.dump());
  auto t = monet::Tokenizer::load_dir(dir.str());
  EXPECT_FALSE(t->encode("hello hello", false).empty());
}

TEST(Tokenizer, ConfigAddedTokensAreChecked) {
  TokDir dir;
  dir.write("tokenizer.model", sp_model(kTinySp));
  auto expect_config_error = [&](const std::string& config, const std::vector<std::string>& parts) {
    dir.write("tokenizer_config.json", config);
    expect_load_error(dir, parts);
  };
  expect_config_error(R"({"added_tokens_decoder": {"300": {"special": true}}})",
                      {"tokenizer_config.json", "added_tokens_decoder[\"300\"]", "\"content\""});
  expect_config_error(R"({"added_tokens_decoder": {"300": "[X]"}})", {"tokenizer_config.json", "added_tokens_decoder[\"300\"]"});
  expect_config_error(R"({"added_tokens_decoder": {"300abc": {"content": "[X]"}}})",
                      {"tokenizer_config.json", "the key must be a token id"});
  expect_config_error(R"({"added_tokens_decoder": {"-3": {"content": "[X]"}}})", {"tokenizer_config.json", "token id"});
  expect_config_error(R"({"added_tokens_decoder": {"300": {"content": "[X]", "special": 1}}})",
                      {"tokenizer_config.json", "added_tokens_decoder[\"300\"].special must be true or false"});
  expect_config_error(R"({"added_tokens_decoder": {"16000000": {"content": "[X]"}}})",
                      {"tokenizer_config.json", "mostly unused"});
  expect_config_error(R"({"added_tokens_decoder": [1, 2]})", {"tokenizer_config.json", "must be an object"});
  expect_config_error(R"({"add_bos_token": "yes"})", {"tokenizer_config.json", "add_bos_token must be true or false"});
  dir.write("tokenizer_config.json", R"({"added_tokens_decoder": {"300": {"content": "[X]", "special": true}}})");
  auto t = monet::Tokenizer::load_dir(dir.str());
  EXPECT_EQ(t->token_id("[X]"), 300);
  EXPECT_EQ(t->vocab_size(), 301);
}

TEST(Tokenizer, SentencePieceFieldsAreChecked) {
  TokDir dir;
  std::vector<SpPiece> pieces = kTinySp;
  pieces.push_back({"q", std::numeric_limits<float>::quiet_NaN(), 1});
  dir.write("tokenizer.model", sp_model(pieces));
  expect_load_error(dir, {"tokenizer.model", "score", "finite"});
  pieces = kTinySp;
  pieces.push_back({"q", 0, 1});
  std::string model = sp_model(pieces);
  // the type of the piece "q" as 2^32 + 1 (which an int cast would read as 1)
  const std::string normal = field_bytes(1, field_bytes(1, "q") + field_float(2, 0) + field_varint(3, 1));
  const std::string huge = field_bytes(1, field_bytes(1, "q") + field_float(2, 0) + field_varint(3, (uint64_t(1) << 32) + 1));
  model.replace(model.find(normal), normal.size(), huge);
  dir.write("tokenizer.model", model);
  expect_load_error(dir, {"tokenizer.model", "unknown type 4294967297"});
}

}  // namespace
