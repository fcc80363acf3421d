// Loading tokenizers: HF tokenizer.json, SentencePiece tokenizer.model
// (sentencepiece_model.h reads its ModelProto) and tokenizer_config.json.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"
#include "tokenizer/sentencepiece_model.h"
#include "tokenizer/utf8.h"

namespace monet {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// "<0x0A>" -> 10, else -1
int byte_piece_value(const std::string& p) {
  if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>') return -1;
  int v = 0;
  for (int k = 3; k < 5; k++) {
    const char c = p[size_t(k)];
    const int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

std::string byte_piece(int b) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "<0x%02X>", b);
  return buf;
}

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

// Optional fields of a tokenizer component (`what` names it in messages):
// `fallback` when absent or null, a monet::Error when of another type.
std::string string_field(const json& obj, const char* key, const std::string& fallback, const std::string& path,
                         const std::string& what) {
  if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return fallback;
  if (!obj[key].is_string()) fail(path, ": ", what, ".", key, " must be a string, found ", obj[key].dump());
  return obj[key].get<std::string>();
}
bool bool_field(const json& obj, const char* key, bool fallback, const std::string& path, const std::string& what) {
  if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return fallback;
  if (!obj[key].is_boolean()) fail(path, ": ", what, ".", key, " must be true or false, found ", obj[key].dump());
  return obj[key].get<bool>();
}

// Strings a normalizer or decoder inserts or looks for: short, so that a text
// grows by a bounded factor (kMaxGrowth below).
constexpr size_t kMaxPatternBytes = 64;
// A normalizer may make a text at most this many times longer (LLaMA's
// Prepend "▁" + Replace " " -> "▁" : 4 x 3 = 12).
constexpr size_t kMaxGrowth = 64;

void check_pattern(const std::string& s, bool allow_empty, const std::string& path, const std::string& what) {
  if (!allow_empty && s.empty()) fail(path, ": ", what, " must not be empty");
  if (s.size() > kMaxPatternBytes)
    fail(path, ": ", what, " has ", s.size(), " bytes; at most ", kMaxPatternBytes, " are supported");
  if (!utf8::is_valid(s)) fail(path, ": ", what, " is not valid UTF-8");
}

// Metaspace's replacement: exactly one character (a Rust char in HF).
std::string metaspace_replacement(const json& component, const std::string& path, const std::string& what) {
  const std::string r = string_field(component, "replacement", utf8::kSpaceMark, path, what);
  if (r.empty() || utf8::valid_char_len(r, 0) != int(r.size()))
    fail(path, ": ", what, ".replacement \"", r, "\" must be exactly one character");
  return r;
}

// Token ids run up to 2^24 (as int32 everywhere) and may have holes, but not
// mostly holes: a file of a few entries must not size a huge vocabulary.
constexpr int64_t kMaxVocab = int64_t(1) << 24;
void check_vocab_ids(int64_t max_id, int64_t defined, const std::string& path) {
  if (max_id >= kMaxVocab) fail(path, ": token id ", max_id, " is too large; ids must be below ", kMaxVocab);
  if (max_id + 1 > 2 * defined + 1024)
    fail(path, ": token ids run up to ", max_id, " but only ", defined,
         " tokens are defined; a vocabulary of mostly unused ids is not supported");
}

// The items of a "Sequence" component (normalizers, decoders, ...), or the component itself.
std::vector<json> flatten(const json& component, const char* list_key) {
  std::vector<json> out;
  if (!component.is_object()) return out;
  if (component.value("type", "") == "Sequence" && component.contains(list_key) && component[list_key].is_array())
    for (const json& x : component[list_key]) out.push_back(x);
  else
    out.push_back(component);
  return out;
}

}  // namespace

// Fills a Tokenizer's private state; keeps the loaders out of the class.
class TokenizerBuilder {
 public:
  static std::unique_ptr<Tokenizer> from_hf_json(const std::string& path);
  static std::unique_ptr<Tokenizer> from_sentencepiece(const std::string& path);
  static void apply_config(Tokenizer& t, const std::string& config_path, bool from_json, bool json_has_template);

 private:
  static void parse_hf(Tokenizer& t, const json& j, const std::string& path, bool* has_template);
  static void finish(Tokenizer& t);
};

void TokenizerBuilder::finish(Tokenizer& t) {
  t.special_.resize(t.pieces_.size(), 0);
  t.byte_values_.assign(t.pieces_.size(), -1);
  if (t.kind_ == Tokenizer::Kind::HfBpe) {
    // byte fallback looks up "<0xNN>" (upper case) among the model's pieces
    std::fill(std::begin(t.byte_ids_), std::end(t.byte_ids_), -1);
    for (int b = 0; b < 256; b++)
      if (auto it = t.vocab_.find(byte_piece(b)); it != t.vocab_.end()) t.byte_ids_[b] = it->second;
    // HF's ByteFallback decoder converts any token spelled "<0xNN>"
    for (size_t id = 0; id < t.pieces_.size(); id++) t.byte_values_[id] = int16_t(byte_piece_value(t.pieces_[id]));
  } else {
    // SentencePiece: the BYTE pieces (byte_ids_, set by the loader) decode as bytes
    for (int b = 0; b < 256; b++)
      if (t.byte_ids_[b] >= 0) t.byte_values_[size_t(t.byte_ids_[b])] = int16_t(b);
  }
  t.raw_added_.index();
  t.normalized_added_.index();
}

void TokenizerBuilder::parse_hf(Tokenizer& t, const json& j, const std::string& path, bool* has_template) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) fail(path, ": missing \"model\" object");
  const json& m = j["model"];
  const std::string type = string_field(m, "type", "BPE", path, "model");
  if (type != "BPE")
    fail(path, ": model type \"", type, "\" is not supported (only BPE with byte fallback, as in LLaMA-family tokenizers)");
  if (!m.contains("vocab") || !m["vocab"].is_object()) fail(path, ": model.vocab must be an object");
  if (m.value("continuing_subword_prefix", json()).is_string() || m.value("end_of_word_suffix", json()).is_string())
    fail(path, ": BPE with continuing_subword_prefix/end_of_word_suffix is not supported");
  if (m.contains("dropout") && m["dropout"].is_number() && m["dropout"].get<double>() > 0)
    fail(path, ": BPE dropout is not supported");
  int64_t max_id = -1;
  for (auto& [piece, id] : m["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      fail(path, ": vocab[\"", piece, "\"] must be a non-negative id");
    max_id = std::max(max_id, id.get<int64_t>());
  }
  if (m["vocab"].empty()) fail(path, ": model.vocab is empty");
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) fail(path, ": added_tokens must be an array");
  for (size_t k = 0; k < added.size(); k++) {
    const json& a = added[k];
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
        a["id"].get<int64_t>() > INT32_MAX || !a.contains("content") || !a["content"].is_string())
      fail(path, ": added_tokens entries need \"content\" and a non-negative \"id\"");
    const std::string what = "added_tokens[" + std::to_string(k) + "]";
    for (const char* flag : {"special", "normalized", "lstrip", "rstrip", "single_word"}) bool_field(a, flag, false, path, what);
    max_id = std::max(max_id, a["id"].get<int64_t>());
  }
  check_vocab_ids(max_id, int64_t(m["vocab"].size() + added.size()), path);
  t.pieces_.assign(size_t(max_id + 1), "");
  for (auto& [piece, id] : m["vocab"].items()) {
    t.pieces_[size_t(id.get<int64_t>())] = piece;
    t.vocab_[piece] = int32_t(id.get<int64_t>());
  }
  t.ids_ = t.vocab_;
  t.byte_fallback_ = bool_field(m, "byte_fallback", false, path, "model");
  t.fuse_unk_ = bool_field(m, "fuse_unk", false, path, "model");
  t.ignore_merges_ = bool_field(m, "ignore_merges", false, path, "model");
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = t.vocab_.find(m["unk_token"].get<std::string>());
    if (it != t.vocab_.end()) t.unk_id_ = it->second;
  }
  const json merges = m.value("merges", json::array());
  if (!merges.is_array()) fail(path, ": model.merges must be an array");
  t.merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); rank++) {
    std::string a, b;
    const json& mg = merges[rank];
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos) fail(path, ": merge ", rank, " \"", s, "\" is not \"a b\"");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      fail(path, ": merge ", rank, " must be \"a b\" or [a, b]");
    }
    if (rank > size_t(INT32_MAX)) fail(path, ": more than ", INT32_MAX, " merges");
    auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), iab = t.vocab_.find(a + b);
    if (ia == t.vocab_.end() || ib == t.vocab_.end() || iab == t.vocab_.end())
      fail(path, ": merge ", rank, " (", a, " + ", b, ") uses a piece missing from the vocab");
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    t.merges_.emplace(key, std::make_pair(int32_t(rank), iab->second));  // the first (lowest) rank wins, as in HF
  }

  // Normalizer: Prepend / Replace, possibly in a Sequence. Each may make the
  // text longer; together by at most kMaxGrowth.
  size_t growth = 1;
  for (const json& n : flatten(j.value("normalizer", json()), "normalizers")) {
    const std::string nt = string_field(n, "type", "", path, "normalizer");
    if (nt == "Prepend") {
      if (!t.replacements_.empty() || !t.prepend_.empty())
        fail(path, ": a Prepend normalizer after Replace or Prepend is not supported");
      t.prepend_ = string_field(n, "prepend", "", path, "normalizer Prepend");
      check_pattern(t.prepend_, true, path, "normalizer Prepend.prepend");
      growth *= 1 + t.prepend_.size();  // a segment of one byte grows most
    } else if (nt == "Replace" && n.contains("pattern") && n["pattern"].is_object() && n["pattern"].contains("String")) {
      const std::string from = string_field(n["pattern"], "String", "", path, "normalizer Replace.pattern");
      const std::string to = string_field(n, "content", "", path, "normalizer Replace");
      check_pattern(from, false, path, "normalizer Replace.pattern.String");
      check_pattern(to, true, path, "normalizer Replace.content");
      growth *= std::max<size_t>(1, (to.size() + from.size() - 1) / from.size());
      t.replacements_.emplace_back(from, to);
    } else {
      fail(path, ": normalizer ", n.dump(), " is not supported (LLaMA-family tokenizers use Prepend/Replace)");
    }
    if (growth > kMaxGrowth)
      fail(path, ": the normalizers can make a text ", growth, " times longer; at most ", kMaxGrowth, " is supported");
  }
  // Pre-tokenizer: Metaspace (alone or the only item of a Sequence)
  const std::vector<json> pres = flatten(j.value("pre_tokenizer", json()), "pretokenizers");
  if (pres.size() > 1) fail(path, ": a pre_tokenizer Sequence of ", pres.size(), " is not supported (only Metaspace)");
  for (const json& p : pres) {
    const std::string pt = string_field(p, "type", "", path, "pre_tokenizer");
    if (pt != "Metaspace") fail(path, ": pre_tokenizer ", pt.empty() ? "?" : pt, " is not supported (only Metaspace)");
    t.metaspace_ = true;
    t.metaspace_char_ = metaspace_replacement(p, path, "pre_tokenizer Metaspace");
    const bool add_prefix_space = bool_field(p, "add_prefix_space", true, path, "pre_tokenizer Metaspace");
    const std::string scheme = string_field(p, "prepend_scheme", add_prefix_space ? "always" : "never", path, "pre_tokenizer Metaspace");
    if (scheme != "first" && scheme != "always" && scheme != "never")
      fail(path, ": Metaspace prepend_scheme \"", scheme, "\" is not supported");
    t.metaspace_prepend_ = scheme == "first" ? Tokenizer::Prepend::First
                           : scheme == "never" ? Tokenizer::Prepend::Never : Tokenizer::Prepend::Always;
    t.metaspace_split_ = bool_field(p, "split", true, path, "pre_tokenizer Metaspace");
  }
  // Decoder: Replace, ByteFallback, Fuse, Strip, Metaspace
  t.decode_bytes_ = false;
  size_t decode_growth = 1;
  for (const json& d : flatten(j.value("decoder", json()), "decoders")) {
    const std::string dt = string_field(d, "type", "", path, "decoder");
    if (dt == "ByteFallback") {
      t.decode_bytes_ = true;
    } else if (dt == "Replace" && d.contains("pattern") && d["pattern"].is_object() && d["pattern"].contains("String")) {
      const std::string from = string_field(d["pattern"], "String", "", path, "decoder Replace.pattern");
      const std::string to = string_field(d, "content", "", path, "decoder Replace");
      check_pattern(from, false, path, "decoder Replace.pattern.String");
      check_pattern(to, true, path, "decoder Replace.content");
      decode_growth *= std::max<size_t>(1, (to.size() + from.size() - 1) / from.size());
      t.decode_replacements_.emplace_back(from, to);
    } else if (dt == "Strip") {
      const json start = d.value("start", json(0)), stop = d.value("stop", json(0));
      if (string_field(d, "content", " ", path, "decoder Strip") != " " || !start.is_number_integer() ||
          !stop.is_number_integer() || start.get<int64_t>() < 0 || start.get<int64_t>() > 1 || stop.get<int64_t>() != 0)
        fail(path, ": decoder Strip ", d.dump(), " is not supported (only one leading space)");
      if (start.get<int64_t>() == 1) t.leading_ = Tokenizer::Leading::StripOneSpace;
    } else if (dt == "Metaspace") {
      t.decode_metaspace_char_ = metaspace_replacement(d, path, "decoder Metaspace");
      t.decode_replacements_.emplace_back(t.decode_metaspace_char_, " ");
      const bool add_prefix_space = bool_field(d, "add_prefix_space", true, path, "decoder Metaspace");
      const std::string scheme = string_field(d, "prepend_scheme", add_prefix_space ? "always" : "never", path, "decoder Metaspace");
      if (scheme != "never") t.leading_ = Tokenizer::Leading::DropFirstTokenMarks;
    } else if (dt != "Fuse") {
      fail(path, ": decoder ", dt, " is not supported (only Replace, ByteFallback, Fuse, Strip, Metaspace)");
    }
    if (decode_growth > kMaxGrowth)
      fail(path, ": the decoders can make a text ", decode_growth, " times longer; at most ", kMaxGrowth, " is supported");
  }
  // Special tokens around a single sequence, from the post-processor.
  *has_template = false;
  if (j.contains("post_processor") && j["post_processor"].is_object()) {
    const json& pp = j["post_processor"];
    const std::string pp_type = string_field(pp, "type", "", path, "post_processor");
    if (pp_type != "TemplateProcessing")
      fail(path, ": post_processor ", pp_type.empty() ? "?" : pp_type, " is not supported (only TemplateProcessing)");
    *has_template = true;
    const json single = pp.value("single", json::array());
    if (!single.is_array()) fail(path, ": post_processor.single must be an array");
    const json table = pp.value("special_tokens", json::object());
    bool after = false;
    for (const json& item : single) {
      if (!item.is_object()) fail(path, ": post_processor.single items must be objects, found ", item.dump());
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = string_field(item["SpecialToken"], "id", "", path, "post_processor SpecialToken");
        // the ids come from the post-processor's special_tokens table, else the vocabulary
        int64_t id = -1;
        if (table.is_object() && table.contains(name) && table[name].is_object() && table[name].contains("ids") &&
            table[name]["ids"].is_array() && !table[name]["ids"].empty()) {
          const json& first = table[name]["ids"][0];
          if (!first.is_number_integer() || first.get<int64_t>() < 0 || first.get<int64_t>() >= int64_t(t.pieces_.size()))
            fail(path, ": post_processor.special_tokens[\"", name, "\"].ids[0] = ", first.dump(),
                 " is not a token id in [0, ", t.pieces_.size(), ")");
          id = first.get<int64_t>();
        } else if (auto it = t.ids_.find(name); it != t.ids_.end()) {
          id = it->second;
        }
        for (const json& a : added)
          if (id < 0 && a["content"] == name) id = a["id"].get<int64_t>();
        if (id < 0) fail(path, ": post_processor names unknown token ", item.dump());
        (after ? t.suffix_ids_ : t.prefix_ids_).push_back(int32_t(id));
      }
    }
  }

  // Added tokens: matched in the raw text (normalized: false) or in each
  // normalised segment, against their own normalised form (normalized: true).
  t.special_.assign(t.pieces_.size(), 0);
  for (const json& a : added) {
    const std::string content = a["content"].get<std::string>();
    const int32_t id = a["id"].get<int32_t>();
    if (content.empty()) continue;  // HF ignores empty added tokens
    t.pieces_[size_t(id)] = content;
    t.ids_[content] = id;
    const bool special = bool_field(a, "special", false, path, "added_tokens");
    if (special) t.special_[size_t(id)] = 1;
    const bool normalized = bool_field(a, "normalized", !special, path, "added_tokens");
    Tokenizer::AddedToken tok{normalized ? t.normalize(content) : content, id, bool_field(a, "lstrip", false, path, "added_tokens"),
                              bool_field(a, "rstrip", false, path, "added_tokens"),
                              bool_field(a, "single_word", false, path, "added_tokens")};
    (normalized ? t.normalized_added_ : t.raw_added_).tokens.push_back(std::move(tok));
  }
}

std::unique_ptr<Tokenizer> TokenizerBuilder::from_hf_json(const std::string& path) {
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
  auto t = std::unique_ptr<Tokenizer>(new Tokenizer());
  t->kind_ = Tokenizer::Kind::HfBpe;
  t->source_ = path;
  bool has_template = false;
  try {
    parse_hf(*t, j, path, &has_template);
  } catch (const json::exception& e) {  // a field of the wrong JSON type
    fail(path, ": unexpected structure (", e.what(), ")");
  }
  finish(*t);
  apply_config(*t, (fs::path(path).parent_path() / "tokenizer_config.json").string(), true, has_template);
  return t;
}

std::unique_ptr<Tokenizer> TokenizerBuilder::from_sentencepiece(const std::string& path) {
  const SentencePieceModel sp = read_sentencepiece_model(path);
  auto t = std::unique_ptr<Tokenizer>(new Tokenizer());
  t->kind_ = Tokenizer::Kind::SentencePieceBpe;
  t->source_ = path;
  t->pieces_ = sp.pieces;
  t->scores_ = sp.scores;
  t->byte_fallback_ = sp.byte_fallback;
  const std::vector<int>& types = sp.types;
  const int model_type = sp.model_type;
  const bool add_dummy_prefix = sp.add_dummy_prefix, remove_extra_ws = sp.remove_extra_whitespaces;
  const bool escape_ws = sp.escape_whitespaces, treat_ws_as_suffix = sp.treat_whitespace_as_suffix;
  const std::string& normalizer_name = sp.normalizer_name;
  const size_t charsmap = sp.charsmap_bytes;
  if (t->pieces_.empty()) fail(path, ": no pieces: not a SentencePiece model");
  if (model_type != 2)
    fail(path, ": SentencePiece model type ", model_type == 1 ? "UNIGRAM" : std::to_string(model_type),
         " is not supported (only BPE, as LLaMA)");
  if (charsmap > 0 || (!normalizer_name.empty() && normalizer_name != "identity"))
    fail(path, ": SentencePiece normalizer \"", normalizer_name, "\" is not supported (only identity, as LLaMA)");
  if (remove_extra_ws) fail(path, ": remove_extra_whitespaces is not supported (LLaMA-family models disable it)");
  if (!escape_ws) fail(path, ": escape_whitespaces = false is not supported");
  if (treat_ws_as_suffix) fail(path, ": treat_whitespace_as_suffix is not supported");
  t->unused_.assign(t->pieces_.size(), 0);
  std::fill(std::begin(t->byte_ids_), std::end(t->byte_ids_), -1);
  for (size_t id = 0; id < t->pieces_.size(); id++) {
    const std::string& p = t->pieces_[id];
    const int type = types[id];  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    if (type < 1 || type > 6) fail(path, ": piece ", id, " has unknown type ", type);
    if (!t->ids_.emplace(p, int32_t(id)).second) fail(path, ": piece \"", p, "\" is defined twice");
    const int byte = byte_piece_value(p);
    if (type == 6 && byte >= 0 && p == byte_piece(byte)) t->byte_ids_[byte] = int32_t(id);
    if (type == 1 || type == 4 || type == 5) t->mergeable_.emplace(p, int32_t(id));
    if (type == 5) t->unused_[id] = 1;
    if (type == 2) t->unk_id_ = int32_t(id);
  }
  t->special_.assign(t->pieces_.size(), 0);
  for (size_t id = 0; id < t->pieces_.size(); id++) {
    const int type = types[id];
    if (type == 2 || type == 3) t->special_[id] = 1;
    // HF's conversion (LlamaConverter) makes unknown/control and user-defined
    // pieces added tokens, found in the raw text before anything else
    if (type == 2 || type == 3 || type == 4)
      t->raw_added_.tokens.push_back({t->pieces_[id], int32_t(id), false, false, false});
  }
  if (add_dummy_prefix) t->prepend_ = utf8::kSpaceMark;
  t->replacements_.emplace_back(" ", utf8::kSpaceMark);
  t->decode_replacements_.emplace_back(utf8::kSpaceMark, " ");
  if (add_dummy_prefix) t->leading_ = Tokenizer::Leading::SentencePiecePrefix;
  finish(*t);
  apply_config(*t, (fs::path(path).parent_path() / "tokenizer_config.json").string(), false, false);
  return t;
}

void TokenizerBuilder::apply_config(Tokenizer& t, const std::string& config_path, bool from_json, bool json_has_template) {
  json cfg = json::object();
  const bool has_config = fs::exists(config_path);
  if (has_config) {
    try {
      cfg = json::parse(read_file(config_path));
    } catch (const json::exception& e) {
      fail(config_path, ": not valid JSON (", e.what(), ")");
    }
    if (!cfg.is_object()) fail(config_path, ": expected a JSON object");
  }
  try {
    auto find_id = [&](const char* key, const char* fallback) {
      const std::string content = cfg.contains(key) ? token_content(cfg[key]) : fallback;
      auto it = t.ids_.find(content);
      return it == t.ids_.end() ? int32_t(-1) : it->second;
    };
    // tokenizer.model: tokens the config adds beyond the SentencePiece vocabulary
    // (added_tokens_decoder), as HF adds them to the converted tokenizer.
    if (!from_json && cfg.contains("added_tokens_decoder") && !cfg["added_tokens_decoder"].is_null()) {
      const json& decoder = cfg["added_tokens_decoder"];
      if (!decoder.is_object()) fail(config_path, ": added_tokens_decoder must be an object (id -> token)");
      const int64_t defined = int64_t(t.pieces_.size() + decoder.size());
      for (auto& [key, a] : decoder.items()) {
        const std::string what = "added_tokens_decoder[\"" + key + "\"]";
        if (key.empty() || key.size() > 9 || !std::all_of(key.begin(), key.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
          fail(config_path, ": ", what, ": the key must be a token id (decimal digits)");
        const int64_t id = std::stoll(key);
        if (!a.is_object() || !a.contains("content") || !a["content"].is_string() || a["content"].get<std::string>().empty())
          fail(config_path, ": ", what, " must be an object with a non-empty string \"content\"");
        const std::string content = a["content"].get<std::string>();
        const bool special = bool_field(a, "special", false, config_path, what);
        const bool normalized = bool_field(a, "normalized", !special, config_path, what);
        const bool lstrip = bool_field(a, "lstrip", false, config_path, what);
        const bool rstrip = bool_field(a, "rstrip", false, config_path, what);
        const bool single_word = bool_field(a, "single_word", false, config_path, what);
        check_vocab_ids(id, defined, config_path);
        if (size_t(id) < t.pieces_.size()) continue;  // already a piece of the model
        t.pieces_.resize(size_t(id) + 1);
        t.special_.resize(t.pieces_.size(), 0);
        t.byte_values_.resize(t.pieces_.size(), -1);
        t.pieces_[size_t(id)] = content;
        t.ids_[content] = int32_t(id);
        if (special) t.special_[size_t(id)] = 1;
        (normalized ? t.normalized_added_ : t.raw_added_).tokens.push_back({content, int32_t(id), lstrip, rstrip, single_word});
      }
    }
    // tokenizer.model: HF's LlamaTokenizer(Fast) with legacy=false has no
    // dummy prefix after special tokens (a Metaspace "first" pre-tokenizer).
    if (!from_json && t.prepend_ == utf8::kSpaceMark && cfg.value("legacy", true) == false) {
      t.prepend_.clear();
      t.metaspace_ = true;
      t.metaspace_prepend_ = Tokenizer::Prepend::First;
      t.metaspace_split_ = false;
      t.replacements_.clear();
    }
    if (!from_json) {
      // normalized added tokens are matched against their normalised form
      for (auto& a : t.normalized_added_.tokens) a.pattern = t.normalize(a.pattern);
    }
    t.bos_id_ = find_id("bos_token", "<s>");
    t.eos_id_ = find_id("eos_token", "</s>");
    if (t.bos_id_ >= 0) t.special_[size_t(t.bos_id_)] = 1;
    if (t.eos_id_ >= 0) t.special_[size_t(t.eos_id_)] = 1;
    // BOS/EOS: HF's LlamaTokenizer(Fast) rebuilds the post-processor from
    // add_bos_token (default true) / add_eos_token (default false); other
    // tokenizer classes keep tokenizer.json's post-processor.
    std::string cls = string_field(cfg, "tokenizer_class", "", config_path, "tokenizer_config");
    if (cls.size() > 4 && cls.compare(cls.size() - 4, 4, "Fast") == 0) cls.resize(cls.size() - 4);
    const bool llama_class = cls == "LlamaTokenizer" || cls == "CodeLlamaTokenizer";
    const bool has_flags = cfg.contains("add_bos_token") || cfg.contains("add_eos_token");
    if (!from_json || llama_class || (cls.empty() && (has_flags || !json_has_template))) {
      t.prefix_ids_.clear();
      t.suffix_ids_.clear();
      if (bool_field(cfg, "add_bos_token", true, config_path, "tokenizer_config") && t.bos_id_ >= 0)
        t.prefix_ids_.push_back(t.bos_id_);
      if (bool_field(cfg, "add_eos_token", false, config_path, "tokenizer_config") && t.eos_id_ >= 0)
        t.suffix_ids_.push_back(t.eos_id_);
    }
    if (cfg.contains("chat_template")) {
      const json& ct = cfg["chat_template"];
      if (ct.is_string()) {
        t.chat_template_ = ct.get<std::string>();
      } else if (ct.is_array()) {  // named templates: use "default"
        for (const json& e : ct)
          if (string_field(e, "name", "", config_path, "chat_template[]") == "default")
            t.chat_template_ = string_field(e, "template", "", config_path, "chat_template[]");
      }
    }
  } catch (const json::exception& e) {
    fail(config_path, ": unexpected structure (", e.what(), ")");
  }
  t.raw_added_.index();
  t.normalized_added_.index();
}

std::unique_ptr<Tokenizer> Tokenizer::load_hf_json(const std::string& path) { return TokenizerBuilder::from_hf_json(path); }

std::unique_ptr<Tokenizer> Tokenizer::load_sentencepiece(const std::string& path) {
  return TokenizerBuilder::from_sentencepiece(path);
}

std::unique_ptr<Tokenizer> Tokenizer::load_dir(const std::string& dir) {
  const fs::path json_path = fs::path(dir) / "tokenizer.json", sp_path = fs::path(dir) / "tokenizer.model";
  if (fs::exists(json_path)) return load_hf_json(json_path.string());
  if (fs::exists(sp_path)) return load_sentencepiece(sp_path.string());
  if (!fs::is_directory(dir)) fail(dir, ": not a directory");
  fail(dir, ": no tokenizer.json or tokenizer.model");
}

}  // namespace monet
