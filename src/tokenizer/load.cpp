// Loading tokenizers: HF tokenizer.json, SentencePiece tokenizer.model
// (sentencepiece_model.h reads its ModelProto) and tokenizer_config.json.
#include <algorithm>
#include <climits>
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
  const std::string type = m.value("type", "BPE");
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
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) fail(path, ": added_tokens must be an array");
  for (const json& a : added) {
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
        a["id"].get<int64_t>() > INT32_MAX || !a.contains("content") || !a["content"].is_string())
      fail(path, ": added_tokens entries need \"content\" and a non-negative \"id\"");
    max_id = std::max(max_id, a["id"].get<int64_t>());
  }
  if (max_id >= (int64_t(1) << 24)) fail(path, ": token id ", max_id, " is implausibly large");
  t.pieces_.assign(size_t(max_id + 1), "");
  for (auto& [piece, id] : m["vocab"].items()) {
    t.pieces_[size_t(id.get<int64_t>())] = piece;
    t.vocab_[piece] = int32_t(id.get<int64_t>());
  }
  t.ids_ = t.vocab_;
  t.byte_fallback_ = m.value("byte_fallback", false);
  t.fuse_unk_ = m.value("fuse_unk", false);
  t.ignore_merges_ = m.value("ignore_merges", false);
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
    auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), iab = t.vocab_.find(a + b);
    if (ia == t.vocab_.end() || ib == t.vocab_.end() || iab == t.vocab_.end())
      fail(path, ": merge ", rank, " (", a, " + ", b, ") uses a piece missing from the vocab");
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    t.merges_.emplace(key, std::make_pair(int32_t(rank), iab->second));  // the first (lowest) rank wins, as in HF
  }

  // Normalizer: Prepend / Replace, possibly in a Sequence
  for (const json& n : flatten(j.value("normalizer", json()), "normalizers")) {
    const std::string nt = n.value("type", "");
    if (nt == "Prepend") {
      if (!t.replacements_.empty() || !t.prepend_.empty())
        fail(path, ": a Prepend normalizer after Replace or Prepend is not supported");
      t.prepend_ = n.value("prepend", "");
    } else if (nt == "Replace" && n.contains("pattern") && n["pattern"].is_object() && n["pattern"].contains("String")) {
      t.replacements_.emplace_back(n["pattern"]["String"].get<std::string>(), n.value("content", ""));
    } else {
      fail(path, ": normalizer ", n.dump(), " is not supported (LLaMA-family tokenizers use Prepend/Replace)");
    }
  }
  // Pre-tokenizer: Metaspace (alone or the only item of a Sequence)
  const std::vector<json> pres = flatten(j.value("pre_tokenizer", json()), "pretokenizers");
  if (pres.size() > 1) fail(path, ": a pre_tokenizer Sequence of ", pres.size(), " is not supported (only Metaspace)");
  for (const json& p : pres) {
    if (p.value("type", "") != "Metaspace")
      fail(path, ": pre_tokenizer ", p.value("type", "?"), " is not supported (only Metaspace)");
    t.metaspace_ = true;
    t.metaspace_char_ = p.value("replacement", utf8::kSpaceMark);
    const std::string scheme = p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    if (scheme != "first" && scheme != "always" && scheme != "never")
      fail(path, ": Metaspace prepend_scheme \"", scheme, "\" is not supported");
    t.metaspace_prepend_ = scheme == "first" ? Tokenizer::Prepend::First
                           : scheme == "never" ? Tokenizer::Prepend::Never : Tokenizer::Prepend::Always;
    t.metaspace_split_ = p.value("split", true);
  }
  // Decoder: Replace, ByteFallback, Fuse, Strip, Metaspace
  t.decode_bytes_ = false;
  for (const json& d : flatten(j.value("decoder", json()), "decoders")) {
    const std::string dt = d.value("type", "");
    if (dt == "ByteFallback") {
      t.decode_bytes_ = true;
    } else if (dt == "Replace" && d.contains("pattern") && d["pattern"].is_object() && d["pattern"].contains("String")) {
      t.decode_replacements_.emplace_back(d["pattern"]["String"].get<std::string>(), d.value("content", ""));
    } else if (dt == "Strip") {
      if (d.value("content", " ") != " " || d.value("start", 0) > 1 || d.value("stop", 0) != 0)
        fail(path, ": decoder Strip ", d.dump(), " is not supported (only one leading space)");
      if (d.value("start", 0) == 1) t.leading_ = Tokenizer::Leading::StripOneSpace;
    } else if (dt == "Metaspace") {
      t.decode_replacements_.emplace_back(d.value("replacement", utf8::kSpaceMark), " ");
      t.metaspace_char_ = d.value("replacement", utf8::kSpaceMark);
      const std::string scheme = d.value("prepend_scheme", d.value("add_prefix_space", true) ? "always" : "never");
      if (scheme != "never") t.leading_ = Tokenizer::Leading::DropFirstTokenMarks;
    } else if (dt != "Fuse") {
      fail(path, ": decoder ", dt, " is not supported (only Replace, ByteFallback, Fuse, Strip, Metaspace)");
    }
  }
  // Special tokens around a single sequence, from the post-processor.
  *has_template = false;
  if (j.contains("post_processor") && j["post_processor"].is_object()) {
    const json& pp = j["post_processor"];
    if (pp.value("type", "") != "TemplateProcessing")
      fail(path, ": post_processor ", pp.value("type", "?"), " is not supported (only TemplateProcessing)");
    *has_template = true;
    bool after = false;
    for (const json& item : pp.value("single", json::array())) {
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        const json& st = item["SpecialToken"];
        const std::string name = st.value("id", "");
        // the ids come from the post-processor's special_tokens table, else the vocabulary
        int32_t id = -1;
        if (pp.contains("special_tokens") && pp["special_tokens"].contains(name) && !pp["special_tokens"][name]["ids"].empty())
          id = pp["special_tokens"][name]["ids"][0].get<int32_t>();
        else if (auto it = t.ids_.find(name); it != t.ids_.end())
          id = it->second;
        for (const json& a : added)
          if (id < 0 && a["content"] == name) id = a["id"].get<int32_t>();
        if (id < 0) fail(path, ": post_processor names unknown token ", item.dump());
        (after ? t.suffix_ids_ : t.prefix_ids_).push_back(id);
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
    if (a.value("special", false)) t.special_[size_t(id)] = 1;
    const bool normalized = a.value("normalized", !a.value("special", false));
    Tokenizer::AddedToken tok{normalized ? t.normalize(content) : content, id, a.value("lstrip", false),
                              a.value("rstrip", false), a.value("single_word", false)};
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
    if (!from_json && cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
      for (auto& [key, a] : cfg["added_tokens_decoder"].items()) {
        const int64_t id = std::stoll(key);
        const std::string content = token_content(a);
        if (id < 0 || id >= (int64_t(1) << 24) || content.empty()) fail(config_path, ": bad added_tokens_decoder entry \"", key, "\"");
        if (size_t(id) < t.pieces_.size()) continue;  // already a piece of the model
        t.pieces_.resize(size_t(id) + 1);
        t.special_.resize(t.pieces_.size(), 0);
        t.byte_values_.resize(t.pieces_.size(), -1);
        t.pieces_[size_t(id)] = content;
        t.ids_[content] = int32_t(id);
        const bool special = a.value("special", false);
        if (special) t.special_[size_t(id)] = 1;
        const bool normalized = a.value("normalized", !special);
        (normalized ? t.normalized_added_ : t.raw_added_)
            .tokens.push_back({content, int32_t(id), a.value("lstrip", false), a.value("rstrip", false), a.value("single_word", false)});
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
    std::string cls = cfg.value("tokenizer_class", "");
    if (cls.size() > 4 && cls.compare(cls.size() - 4, 4, "Fast") == 0) cls.resize(cls.size() - 4);
    const bool llama_class = cls == "LlamaTokenizer" || cls == "CodeLlamaTokenizer";
    const bool has_flags = cfg.contains("add_bos_token") || cfg.contains("add_eos_token");
    if (!from_json || llama_class || (cls.empty() && (has_flags || !json_has_template))) {
      t.prefix_ids_.clear();
      t.suffix_ids_.clear();
      if (cfg.value("add_bos_token", true) && t.bos_id_ >= 0) t.prefix_ids_.push_back(t.bos_id_);
      if (cfg.value("add_eos_token", false) && t.eos_id_ >= 0) t.suffix_ids_.push_back(t.eos_id_);
    }
    if (cfg.contains("chat_template")) {
      const json& ct = cfg["chat_template"];
      if (ct.is_string()) {
        t.chat_template_ = ct.get<std::string>();
      } else if (ct.is_array()) {  // named templates: use "default"
        for (const json& e : ct)
          if (e.value("name", "") == "default") t.chat_template_ = e.value("template", "");
      }
    }
  } catch (const json::exception& e) {
    fail(config_path, ": unexpected structure (", e.what(), ")");
  } catch (const std::logic_error& e) {  // std::stoll on a bad key
    fail(config_path, ": bad added_tokens_decoder id (", e.what(), ")");
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
