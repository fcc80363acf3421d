#include "monet/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>

#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kSpaceMark = "\xe2\x96\x81";  // ▁ U+2581
const std::string kReplacementChar = "\xef\xbf\xbd";

// Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes).
size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 1;
}

// Length of a valid UTF-8 character at s[i], 0 if incomplete at the end, -1 if invalid.
int valid_char_len(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  size_t n = utf8_len(c);
  if (n == 1) return -1;
  for (size_t k = 1; k < n; k++) {
    if (i + k >= s.size()) return 0;
    if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return -1;
  }
  // reject overlong / surrogate / out-of-range encodings
  uint32_t cp = c & (0xff >> (n + 1));
  for (size_t k = 1; k < n; k++) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
  if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
      (cp >= 0xd800 && cp <= 0xdfff))
    return -1;
  return int(n);
}

// Invalid bytes become U+FFFD, one each (as HF's ByteFallback decoder does).
std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    int n = valid_char_len(s, i);
    if (n > 0) {
      out.append(s.substr(i, size_t(n)));
      i += size_t(n);
    } else {
      out += kReplacementChar;
      i++;
    }
  }
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t at; (at = s.find(from, pos)) != std::string::npos; pos = at + from.size()) {
    out.append(s, pos, at - pos);
    out += to;
  }
  out.append(s, pos);
  s.swap(out);
}

// "<0x0A>" -> 10, else -1
int byte_piece_value(const std::string& p) {
  if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>') return -1;
  int v = 0;
  for (int k = 3; k < 5; k++) {
    char c = p[size_t(k)];
    int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

// --- a minimal protobuf wire-format reader for SentencePiece's ModelProto ---
struct ProtoReader {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& src;

  bool done() const { return p >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) fail(src, ": truncated protobuf");
      uint8_t b = *p++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(src, ": malformed protobuf varint");
  }
  // Returns field number; sets wire type.
  uint32_t key(uint32_t* wire) {
    uint64_t k = varint();
    *wire = uint32_t(k & 7);
    return uint32_t(k >> 3);
  }
  std::string_view bytes() {
    uint64_t n = varint();
    if (n > uint64_t(end - p)) fail(src, ": truncated protobuf field");
    std::string_view s(reinterpret_cast<const char*>(p), size_t(n));
    p += n;
    return s;
  }
  float f32() {
    if (end - p < 4) fail(src, ": truncated protobuf field");
    float f;
    std::memcpy(&f, p, 4);
    p += 4;
    return f;
  }
  void skip(uint32_t wire) {
    switch (wire) {
      case 0: varint(); break;
      case 1: if (end - p < 8) fail(src, ": truncated protobuf"); p += 8; break;
      case 2: bytes(); break;
      case 5: if (end - p < 4) fail(src, ": truncated protobuf"); p += 4; break;
      default: fail(src, ": unsupported protobuf wire type ", wire);
    }
  }
};

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

}  // namespace

// Fills a Tokenizer's private state; keeps the loaders out of the class.
class TokenizerBuilder {
 public:
  static std::unique_ptr<Tokenizer> from_hf_json(const std::string& path);
  static std::unique_ptr<Tokenizer> from_sentencepiece(const std::string& path);
  static void apply_config(Tokenizer& t, const std::string& config_path, bool template_from_json);
  static void finish(Tokenizer& t) {
    std::fill(std::begin(t.byte_ids_), std::end(t.byte_ids_), -1);
    t.special_.resize(t.pieces_.size(), 0);
    for (size_t id = 0; id < t.pieces_.size(); id++) {
      int b = byte_piece_value(t.pieces_[id]);
      if (b >= 0) t.byte_ids_[b] = int32_t(id);
    }
  }
};

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
  if (!j.contains("model") || !j["model"].is_object()) fail(path, ": missing \"model\"");
  const json& m = j["model"];
  const std::string type = m.value("type", "BPE");
  if (type != "BPE") fail(path, ": model type \"", type, "\" is not supported (only BPE, as in LLaMA-family tokenizers)");
  if (!m.contains("vocab") || !m["vocab"].is_object()) fail(path, ": model.vocab must be an object");
  if (m.value("continuing_subword_prefix", json()).is_string() || m.value("end_of_word_suffix", json()).is_string())
    fail(path, ": BPE with continuing_subword_prefix/end_of_word_suffix is not supported");
  int32_t max_id = -1;
  for (auto& [piece, id] : m["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) fail(path, ": vocab[\"", piece, "\"] must be a non-negative id");
    max_id = std::max(max_id, int32_t(id.get<int64_t>()));
  }
  const json added = j.value("added_tokens", json::array());
  for (const json& a : added) max_id = std::max(max_id, int32_t(a.value("id", 0)));
  t->pieces_.assign(size_t(max_id + 1), "");
  for (auto& [piece, id] : m["vocab"].items()) {
    t->pieces_[size_t(id.get<int64_t>())] = piece;
    t->ids_[piece] = int32_t(id.get<int64_t>());
  }
  t->byte_fallback_ = m.value("byte_fallback", false);
  t->fuse_unk_ = m.value("fuse_unk", false);
  t->ignore_merges_ = m.value("ignore_merges", false);
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = t->ids_.find(m["unk_token"].get<std::string>());
    if (it != t->ids_.end()) t->unk_id_ = it->second;
  }
  const json merges = m.value("merges", json::array());
  for (size_t rank = 0; rank < merges.size(); rank++) {
    std::string a, b;
    const json& mg = merges[rank];
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos) fail(path, ": merge ", rank, " \"", s, "\" is not \"a b\"");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mg.is_array() && mg.size() == 2) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      fail(path, ": merge ", rank, " must be \"a b\" or [a, b]");
    }
    auto ia = t->ids_.find(a), ib = t->ids_.find(b), iab = t->ids_.find(a + b);
    if (ia == t->ids_.end() || ib == t->ids_.end() || iab == t->ids_.end())
      fail(path, ": merge ", rank, " (", a, " + ", b, ") uses a piece missing from the vocab");
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    t->merges_.emplace(key, std::make_pair(int32_t(rank), iab->second));
  }
  TokenizerBuilder::finish(*t);
  for (const json& a : added) {
    const std::string content = a.value("content", "");
    const int32_t id = a.value("id", -1);
    if (content.empty() || id < 0) fail(path, ": added_tokens entries need \"content\" and \"id\"");
    t->pieces_[size_t(id)] = content;
    t->ids_[content] = id;
    if (a.value("special", false)) t->special_[size_t(id)] = 1;
    t->added_.push_back({content, id, a.value("lstrip", false), a.value("rstrip", false)});
  }
  // Normalizer: Prepend / Replace (possibly in a Sequence)
  std::vector<json> norms;
  if (j.contains("normalizer") && j["normalizer"].is_object()) {
    const json& n = j["normalizer"];
    if (n.value("type", "") == "Sequence")
      for (const json& x : n["normalizers"]) norms.push_back(x);
    else
      norms.push_back(n);
  }
  for (const json& n : norms) {
    const std::string nt = n.value("type", "");
    if (nt == "Prepend") {
      if (!t->replacements_.empty()) fail(path, ": a Prepend normalizer after Replace is not supported");
      t->prepend_ = n.value("prepend", "");
    } else if (nt == "Replace" && n.contains("pattern") && n["pattern"].contains("String")) {
      t->replacements_.emplace_back(n["pattern"]["String"].get<std::string>(), n.value("content", ""));
    } else {
      fail(path, ": normalizer ", n.dump(), " is not supported (LLaMA-family tokenizers use Prepend/Replace)");
    }
  }
  if (j.contains("pre_tokenizer") && j["pre_tokenizer"].is_object()) {
    const json& p = j["pre_tokenizer"];
    if (p.value("type", "") != "Metaspace")
      fail(path, ": pre_tokenizer ", p.value("type", "?"), " is not supported (only Metaspace)");
    t->metaspace_ = true;
    t->metaspace_char_ = p.value("replacement", kSpaceMark);
    std::string scheme = p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    t->metaspace_prepend_ = scheme == "first" ? Tokenizer::Prepend::First
                            : scheme == "never" ? Tokenizer::Prepend::Never : Tokenizer::Prepend::Always;
    t->metaspace_split_ = p.value("split", true);
  }
  // Decoder: Replace, ByteFallback, Fuse, Strip, Metaspace
  std::vector<json> decs;
  if (j.contains("decoder") && j["decoder"].is_object()) {
    const json& d = j["decoder"];
    if (d.value("type", "") == "Sequence")
      for (const json& x : d["decoders"]) decs.push_back(x);
    else
      decs.push_back(d);
  }
  t->decode_bytes_ = false;
  for (const json& d : decs) {
    const std::string dt = d.value("type", "");
    if (dt == "ByteFallback") t->decode_bytes_ = true;
    if (dt == "Replace" && d.contains("pattern") && d["pattern"].contains("String")) {
      t->decode_replacements_.emplace_back(d["pattern"]["String"].get<std::string>(), d.value("content", ""));
    } else if (dt == "Strip") {
      if (d.value("content", " ") != " " || d.value("start", 0) > 1 || d.value("stop", 0) != 0)
        fail(path, ": decoder Strip ", d.dump(), " is not supported (only one leading space)");
      if (d.value("start", 0) == 1) t->leading_ = Tokenizer::Leading::StripOneSpace;
    } else if (dt == "Metaspace") {
      t->decode_replacements_.emplace_back(d.value("replacement", kSpaceMark), " ");
      t->metaspace_char_ = d.value("replacement", kSpaceMark);
      const std::string scheme = d.value("prepend_scheme", d.value("add_prefix_space", true) ? "always" : "never");
      if (scheme != "never") t->leading_ = Tokenizer::Leading::DropFirstTokenMarks;
    } else if (dt != "ByteFallback" && dt != "Fuse") {
      fail(path, ": decoder ", dt, " is not supported");
    }
  }
  // Special tokens around a single sequence, from the post-processor.
  if (j.contains("post_processor") && j["post_processor"].is_object() &&
      j["post_processor"].value("type", "") == "TemplateProcessing") {
    bool after = false;
    for (const json& item : j["post_processor"]["single"]) {
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        auto it = t->ids_.find(item["SpecialToken"].value("id", ""));
        if (it == t->ids_.end()) fail(path, ": post_processor names unknown token ", item.dump());
        (after ? t->suffix_ids_ : t->prefix_ids_).push_back(it->second);
      }
    }
  }
  return t;
}

std::unique_ptr<Tokenizer> TokenizerBuilder::from_sentencepiece(const std::string& path) {
  const std::string data = read_file(path);
  auto t = std::unique_ptr<Tokenizer>(new Tokenizer());
  t->kind_ = Tokenizer::Kind::SentencePieceBpe;
  t->source_ = path;
  ProtoReader r{reinterpret_cast<const uint8_t*>(data.data()), reinterpret_cast<const uint8_t*>(data.data()) + data.size(), path};
  std::vector<int> types;
  int model_type = 1;  // UNIGRAM is the proto default
  bool add_dummy_prefix = true, remove_extra_ws = true, escape_ws = true;
  std::string normalizer_name;
  size_t charsmap = 0;
  while (!r.done()) {
    uint32_t wire, field = r.key(&wire);
    if (field == 1 && wire == 2) {  // SentencePiece
      std::string_view msg = r.bytes();
      ProtoReader pr{reinterpret_cast<const uint8_t*>(msg.data()), reinterpret_cast<const uint8_t*>(msg.data()) + msg.size(), path};
      std::string piece;
      float score = 0;
      int type = 1;
      while (!pr.done()) {
        uint32_t w, f = pr.key(&w);
        if (f == 1 && w == 2) piece = std::string(pr.bytes());
        else if (f == 2 && w == 5) score = pr.f32();
        else if (f == 3 && w == 0) type = int(pr.varint());
        else pr.skip(w);
      }
      t->pieces_.push_back(piece);
      t->scores_.push_back(score);
      types.push_back(type);
    } else if (field == 2 && wire == 2) {  // TrainerSpec
      std::string_view msg = r.bytes();
      ProtoReader tr{reinterpret_cast<const uint8_t*>(msg.data()), reinterpret_cast<const uint8_t*>(msg.data()) + msg.size(), path};
      while (!tr.done()) {
        uint32_t w, f = tr.key(&w);
        if (f == 3 && w == 0) model_type = int(tr.varint());
        else if (f == 35 && w == 0) t->byte_fallback_ = tr.varint() != 0;
        else tr.skip(w);
      }
    } else if (field == 3 && wire == 2) {  // NormalizerSpec
      std::string_view msg = r.bytes();
      ProtoReader nr{reinterpret_cast<const uint8_t*>(msg.data()), reinterpret_cast<const uint8_t*>(msg.data()) + msg.size(), path};
      while (!nr.done()) {
        uint32_t w, f = nr.key(&w);
        if (f == 1 && w == 2) normalizer_name = std::string(nr.bytes());
        else if (f == 2 && w == 2) charsmap = nr.bytes().size();
        else if (f == 3 && w == 0) add_dummy_prefix = nr.varint() != 0;
        else if (f == 4 && w == 0) remove_extra_ws = nr.varint() != 0;
        else if (f == 5 && w == 0) escape_ws = nr.varint() != 0;
        else nr.skip(w);
      }
    } else {
      r.skip(wire);
    }
  }
  if (t->pieces_.empty()) fail(path, ": no pieces: not a SentencePiece model");
  if (model_type != 2) fail(path, ": SentencePiece model type ", model_type, " is not supported (only BPE, type 2, as LLaMA)");
  if (charsmap > 0 || (!normalizer_name.empty() && normalizer_name != "identity"))
    fail(path, ": SentencePiece normalizer \"", normalizer_name, "\" is not supported (only identity, as LLaMA)");
  if (remove_extra_ws) fail(path, ": remove_extra_whitespaces is not supported (LLaMA-family models disable it)");
  if (!escape_ws) fail(path, ": escape_whitespaces = false is not supported");
  TokenizerBuilder::finish(*t);
  for (size_t id = 0; id < t->pieces_.size(); id++) {
    const std::string& p = t->pieces_[id];
    const int type = types[id];  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    t->ids_.emplace(p, int32_t(id));
    if (type == 1 || type == 4) t->mergeable_.emplace(p, int32_t(id));
    if (type == 4) t->added_.push_back({p, int32_t(id), false, false});
    if (type == 2) t->unk_id_ = int32_t(id);
    if (type == 2 || type == 3) t->special_[id] = 1;
  }
  // SentencePiece matches user-defined pieces inside the normalised text; we
  // keep them with the added tokens but they are matched after normalisation.
  if (add_dummy_prefix) t->prepend_ = kSpaceMark;
  t->replacements_.emplace_back(" ", kSpaceMark);
  t->decode_replacements_.emplace_back(kSpaceMark, " ");
  if (add_dummy_prefix) t->leading_ = Tokenizer::Leading::StripOneSpace;
  return t;
}

void TokenizerBuilder::apply_config(Tokenizer& t, const std::string& config_path, bool template_from_json) {
  json cfg = json::object();
  if (fs::exists(config_path)) {
    try {
      cfg = json::parse(read_file(config_path));
    } catch (const json::exception& e) {
      fail(config_path, ": not valid JSON (", e.what(), ")");
    }
  }
  auto find_id = [&](const char* key, const char* fallback) {
    std::string content = cfg.contains(key) ? token_content(cfg[key]) : fallback;
    auto it = t.ids_.find(content);
    return it == t.ids_.end() ? int32_t(-1) : it->second;
  };
  t.bos_id_ = find_id("bos_token", "<s>");
  t.eos_id_ = find_id("eos_token", "</s>");
  if (t.bos_id_ >= 0) t.special_[size_t(t.bos_id_)] = 1;
  if (t.eos_id_ >= 0) t.special_[size_t(t.eos_id_)] = 1;
  // LLaMA-family HF tokenizers rebuild their post-processor from these flags.
  const bool has_flags = cfg.contains("add_bos_token") || cfg.contains("add_eos_token");
  if (!template_from_json || has_flags) {
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
}

std::unique_ptr<Tokenizer> Tokenizer::load_hf_json(const std::string& path) {
  auto t = TokenizerBuilder::from_hf_json(path);
  TokenizerBuilder::apply_config(*t, (fs::path(path).parent_path() / "tokenizer_config.json").string(), true);
  return t;
}

std::unique_ptr<Tokenizer> Tokenizer::load_sentencepiece(const std::string& path) {
  auto t = TokenizerBuilder::from_sentencepiece(path);
  TokenizerBuilder::apply_config(*t, (fs::path(path).parent_path() / "tokenizer_config.json").string(), false);
  return t;
}

std::unique_ptr<Tokenizer> Tokenizer::load_dir(const std::string& dir) {
  const fs::path json_path = fs::path(dir) / "tokenizer.json", sp_path = fs::path(dir) / "tokenizer.model";
  if (fs::exists(json_path)) return load_hf_json(json_path.string());
  if (fs::exists(sp_path)) return load_sentencepiece(sp_path.string());
  fail(dir, ": no tokenizer.json or tokenizer.model");
}

Tokenizer::~Tokenizer() = default;

const std::string& Tokenizer::piece(int32_t id) const {
  if (id < 0 || size_t(id) >= pieces_.size()) fail(source_, ": token id ", id, " is outside the vocabulary [0, ", pieces_.size(), ")");
  return pieces_[size_t(id)];
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && size_t(id) < special_.size() && special_[size_t(id)]; }

int32_t Tokenizer::token_id(const std::string& p) const {
  auto it = ids_.find(p);
  return it == ids_.end() ? -1 : it->second;
}

// ---- BPE ------------------------------------------------------------------

struct Tokenizer::Symbol {
  size_t start, len;  // bytes of the word
  int32_t id;         // HF: the symbol's token id
  int prev, next;
};

void Tokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (kind_ == Kind::HfBpe && ignore_merges_) {
    auto it = ids_.find(std::string(word));
    if (it != ids_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<Symbol> sym;
  // Initial symbols: characters (HF: characters missing from the vocab become bytes or unk).
  for (size_t i = 0; i < word.size();) {
    size_t n = std::min(utf8_len(static_cast<unsigned char>(word[i])), word.size() - i);
    int32_t id = -1;
    if (kind_ == Kind::HfBpe) {
      auto it = ids_.find(std::string(word.substr(i, n)));
      if (it != ids_.end()) {
        id = it->second;
      } else if (byte_fallback_) {
        bool all = true;
        for (size_t k = 0; k < n; k++) all &= byte_ids_[static_cast<unsigned char>(word[i + k])] >= 0;
        if (all) {
          for (size_t k = 0; k < n; k++)
            sym.push_back({i + k, 1, byte_ids_[static_cast<unsigned char>(word[i + k])], int(sym.size()) - 1, int(sym.size()) + 1});
          i += n;
          continue;
        }
        id = unk_id_;
      } else {
        id = unk_id_;
      }
      if (id < 0) fail(source_, ": cannot encode a character and the tokenizer has no unk token");
      if (fuse_unk_ && id == unk_id_ && !sym.empty() && sym.back().id == unk_id_) {
        sym.back().len += n;
        i += n;
        continue;
      }
    }
    sym.push_back({i, n, id, int(sym.size()) - 1, int(sym.size()) + 1});
    i += n;
  }
  sym.back().next = -1;

  // Merge the best pair first (HF: lowest merge rank; SentencePiece: highest
  // piece score), leftmost on ties, until no pair merges.
  struct Candidate {
    double priority;
    int left, right;
    size_t left_len, right_len;
    int32_t id;
    bool operator<(const Candidate& o) const {  // max-heap: invert
      return priority > o.priority || (priority == o.priority && left > o.left);
    }
  };
  std::priority_queue<Candidate> queue;
  auto consider = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    if (kind_ == Kind::HfBpe) {
      const uint64_t key = (uint64_t(uint32_t(sym[size_t(l)].id)) << 32) | uint32_t(sym[size_t(r)].id);
      auto it = merges_.find(key);
      if (it == merges_.end()) return;
      queue.push({double(it->second.first), l, r, sym[size_t(l)].len, sym[size_t(r)].len, it->second.second});
    } else {
      auto it = mergeable_.find(std::string(word.substr(sym[size_t(l)].start, sym[size_t(l)].len + sym[size_t(r)].len)));
      if (it == mergeable_.end()) return;
      queue.push({-double(scores_[size_t(it->second)]), l, r, sym[size_t(l)].len, sym[size_t(r)].len, it->second});
    }
  };
  for (size_t i = 0; i + 1 < sym.size(); i++) consider(int(i), int(i + 1));
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = sym[size_t(c.left)];
    Symbol& r = sym[size_t(c.right)];
    if (l.len != c.left_len || r.len != c.right_len || l.next != c.right) continue;  // stale
    l.len += r.len;
    l.id = c.id;
    l.next = r.next;
    if (r.next >= 0) sym[size_t(r.next)].prev = c.left;
    r.len = 0;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
  for (int i = 0; i >= 0; i = sym[size_t(i)].next) {
    const Symbol& s = sym[size_t(i)];
    if (kind_ == Kind::HfBpe) {
      out.push_back(s.id);
      continue;
    }
    auto it = ids_.find(std::string(word.substr(s.start, s.len)));
    if (it != ids_.end()) {
      out.push_back(it->second);
      continue;
    }
    bool bytes_ok = byte_fallback_;
    for (size_t k = 0; k < s.len && bytes_ok; k++) bytes_ok = byte_ids_[static_cast<unsigned char>(word[s.start + k])] >= 0;
    if (bytes_ok) {
      for (size_t k = 0; k < s.len; k++) out.push_back(byte_ids_[static_cast<unsigned char>(word[s.start + k])]);
    } else {
      if (unk_id_ < 0) fail(source_, ": cannot encode a character and the model has no unknown piece");
      if (!out.empty() && out.back() == unk_id_) continue;  // SentencePiece merges unknowns
      out.push_back(unk_id_);
    }
  }
}

void Tokenizer::encode_segment(std::string_view raw, bool first_segment, std::vector<int32_t>& out) const {
  if (raw.empty()) return;
  std::string text = prepend_ + std::string(raw);
  for (const auto& [from, to] : replacements_) replace_all(text, from, to);
  if (metaspace_) {
    replace_all(text, " ", metaspace_char_);
    const bool starts = text.compare(0, metaspace_char_.size(), metaspace_char_) == 0;
    if (!starts && (metaspace_prepend_ == Prepend::Always || (metaspace_prepend_ == Prepend::First && first_segment)))
      text = metaspace_char_ + text;
  }
  if (kind_ == Kind::SentencePieceBpe && !added_.empty()) {
    // user-defined pieces are atomic inside the normalised text
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      const AddedToken* best = nullptr;
      for (const AddedToken& a : added_)
        if (text.compare(i, a.content.size(), a.content) == 0 && (!best || a.content.size() > best->content.size()))
          best = &a;
      if (best) {
        bpe(std::string_view(text).substr(start, i - start), out);
        out.push_back(best->id);
        i += best->content.size();
        start = i;
      } else {
        i += utf8_len(static_cast<unsigned char>(text[i]));
      }
    }
    bpe(std::string_view(text).substr(start), out);
    return;
  }
  if (metaspace_ && metaspace_split_) {
    // words begin at each metaspace character
    size_t start = 0;
    for (size_t i = metaspace_char_.size(); i < text.size();) {
      if (text.compare(i, metaspace_char_.size(), metaspace_char_) == 0) {
        bpe(std::string_view(text).substr(start, i - start), out);
        start = i;
        i += metaspace_char_.size();
      } else {
        i++;
      }
    }
    bpe(std::string_view(text).substr(start), out);
    return;
  }
  bpe(text, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  if (add_special) out = prefix_ids_;
  if (kind_ == Kind::SentencePieceBpe || added_.empty()) {
    encode_segment(text, true, out);
  } else {
    // HF: added tokens are found in the raw text first (leftmost, longest).
    size_t seg_start = 0;
    bool first = true;
    size_t i = 0;
    while (i < text.size()) {
      const AddedToken* best = nullptr;
      for (const AddedToken& a : added_)
        if (text.compare(i, a.content.size(), a.content) == 0 && (!best || a.content.size() > best->content.size()))
          best = &a;
      if (!best) {
        i++;
        continue;
      }
      size_t seg_end = i;
      if (best->lstrip)
        while (seg_end > seg_start && std::isspace(static_cast<unsigned char>(text[seg_end - 1]))) seg_end--;
      encode_segment(text.substr(seg_start, seg_end - seg_start), first && seg_start == 0, out);
      first = false;
      out.push_back(best->id);
      i += best->content.size();
      if (best->rstrip)
        while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) i++;
      seg_start = i;
    }
    encode_segment(text.substr(seg_start), seg_start == 0, out);
  }
  if (add_special) out.insert(out.end(), suffix_ids_.begin(), suffix_ids_.end());
  return out;
}

std::vector<int32_t> Tokenizer::encode_with_specials(std::string_view text) const {
  if (kind_ == Kind::HfBpe) return encode(text, false);
  std::vector<int32_t> out;
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    int32_t match = -1;
    size_t len = 0;
    for (size_t id = 0; id < special_.size(); id++)
      if (special_[id] && int32_t(id) != unk_id_ && pieces_[id].size() > len && text.compare(i, pieces_[id].size(), pieces_[id]) == 0) {
        match = int32_t(id);
        len = pieces_[id].size();
      }
    if (match < 0) {
      i++;
      continue;
    }
    encode_segment(text.substr(start, i - start), start == 0, out);
    out.push_back(match);
    i += len;
    start = i;
  }
  encode_segment(text.substr(start), start == 0, out);
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool first) const {
  // Models may have more embedding rows than the tokenizer has pieces
  // (padded vocabularies); such ids decode to nothing, as in HF.
  if (id < 0 || size_t(id) >= pieces_.size()) return "";
  const std::string& p = pieces_[size_t(id)];
  const int b = byte_piece_value(p);
  if (b >= 0 && byte_ids_[b] == id && decode_bytes_) return std::string(1, char(b));
  if (kind_ == Kind::SentencePieceBpe && special_[size_t(id)]) return id == unk_id_ ? " \xe2\x81\x87 " : "";
  std::string s = p;
  if (first && leading_ == Leading::DropFirstTokenMarks) replace_all(s, metaspace_char_, "");
  for (const auto& [from, to] : decode_replacements_) replace_all(s, from, to);
  return s;
}

std::string Tokenizer::token_text(int32_t id) const { return sanitize_utf8(token_bytes(id, false)); }

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string raw;
  bool first = true;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    raw += token_bytes(id, first);
    first = false;
  }
  if (leading_ == Leading::StripOneSpace && !raw.empty() && raw[0] == ' ') raw.erase(0, 1);
  return sanitize_utf8(raw);
}

std::string StreamDecoder::feed(int32_t id) {
  if (skip_special_ && tok_.is_special(id)) return "";
  std::string bytes = tok_.token_bytes(id, first_token_);
  first_token_ = false;
  if (!stripped_ && !bytes.empty()) {
    if (tok_.strips_one_leading_space() && bytes[0] == ' ') bytes.erase(0, 1);
    stripped_ = true;
  }
  pending_ += bytes;
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    int n = valid_char_len(pending_, i);
    if (n == 0) break;  // incomplete: wait for more bytes
    if (n < 0) {
      out += kReplacementChar;
      i++;
    } else {
      out.append(pending_, i, size_t(n));
      i += size_t(n);
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = sanitize_utf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace monet
