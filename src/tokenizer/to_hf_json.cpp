// tokenizer.json from a SentencePiece tokenizer.model, as transformers makes
// it: LlamaTokenizerFast converts the model with LlamaConverter (BPE over the
// pieces, merges recovered from the piece scores, byte fallback) and rebuilds
// the post-processor from add_bos_token / add_eos_token; save_pretrained then
// writes it. With this file beside tokenizer.model, AutoTokenizer needs
// neither sentencepiece nor protobuf.
#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>
#include <unordered_map>

#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"
#include "tokenizer/sentencepiece_model.h"
#include "tokenizer/utf8.h"

namespace monet {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

namespace {

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

// Byte offsets of the code point boundaries of s (0 and s.size() included).
std::vector<size_t> char_boundaries(const std::string& s) {
  std::vector<size_t> at = {0};
  for (size_t i = 0; i < s.size();) {
    i += std::min(utf8::seq_len(static_cast<unsigned char>(s[i])), s.size() - i);
    at.push_back(i);
  }
  return at;
}

struct Merge {
  int32_t left, right;  // piece ids
  float score;
  size_t left_chars, right_chars;
};

// transformers' generate_merges: every split of every piece into two pieces
// of the vocabulary (pieces in id order, a piece's splits by (left id, right
// id)), then a stable sort by (score, left length, right length), highest
// first. BPE applies merges by this rank.
std::vector<Merge> recover_merges(const std::vector<std::string>& pieces, const std::vector<float>& scores) {
  std::unordered_map<std::string, int32_t> id_of;
  for (size_t id = 0; id < pieces.size(); id++) id_of.emplace(pieces[id], int32_t(id));
  std::vector<Merge> merges;
  for (size_t id = 0; id < pieces.size(); id++) {
    const std::string& piece = pieces[id];
    const std::vector<size_t> at = char_boundaries(piece);
    std::vector<Merge> local;
    for (size_t k = 1; k + 1 < at.size(); k++) {
      auto l = id_of.find(piece.substr(0, at[k]));
      auto r = id_of.find(piece.substr(at[k]));
      if (l == id_of.end() || r == id_of.end()) continue;
      local.push_back({l->second, r->second, scores[id], k, at.size() - 1 - k});
    }
    std::sort(local.begin(), local.end(),
              [](const Merge& a, const Merge& b) { return std::tie(a.left, a.right) < std::tie(b.left, b.right); });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    return std::tie(a.score, a.left_chars, a.right_chars) > std::tie(b.score, b.left_chars, b.right_chars);
  });
  return merges;
}

ordered_json added_token(int64_t id, const std::string& content, bool normalized, bool special, bool lstrip = false,
                         bool rstrip = false, bool single_word = false) {
  ordered_json a;
  a["id"] = id;
  a["content"] = content;
  a["single_word"] = single_word;
  a["lstrip"] = lstrip;
  a["rstrip"] = rstrip;
  a["normalized"] = normalized;
  a["special"] = special;
  return a;
}

ordered_json special_token(const std::string& token, int type_id) {
  return {{"SpecialToken", {{"id", token}, {"type_id", type_id}}}};
}

ordered_json sequence(const char* id, int type_id) { return {{"Sequence", {{"id", id}, {"type_id", type_id}}}}; }

}  // namespace

std::string sentencepiece_to_tokenizer_json(const std::string& model_path) {
  const SentencePieceModel sp = read_sentencepiece_model(model_path);
  if (sp.pieces.empty()) fail(model_path, ": no pieces: not a SentencePiece model");
  if (sp.model_type != 2)
    fail(model_path, ": SentencePiece model type ", sp.model_type == 1 ? "UNIGRAM" : std::to_string(sp.model_type),
         " cannot be converted to a BPE tokenizer.json (only BPE, as LLaMA)");
  const std::string config_path = (fs::path(model_path).parent_path() / "tokenizer_config.json").string();
  json cfg = json::object();
  if (fs::exists(config_path)) {
    try {
      cfg = json::parse(read_file(config_path));
    } catch (const json::exception& e) {
      fail(config_path, ": not valid JSON (", e.what(), ")");
    }
    if (!cfg.is_object()) fail(config_path, ": expected a JSON object");
  }
  auto flag = [&](const char* key, bool fallback) {
    if (!cfg.contains(key) || cfg[key].is_null()) return fallback;
    if (!cfg[key].is_boolean()) fail(config_path, ": \"", key, "\" must be true or false");
    return cfg[key].get<bool>();
  };
  const bool legacy = flag("legacy", true);
  const bool add_prefix_space = flag("add_prefix_space", true);
  const bool add_bos = flag("add_bos_token", true), add_eos = flag("add_eos_token", false);

  // The converter's vocabulary: the pieces in id order (LlamaConverter gives
  // the first three score 0).
  std::vector<float> scores = sp.scores;
  for (size_t id = 0; id < std::min<size_t>(3, scores.size()); id++) scores[id] = 0.0f;
  std::unordered_map<std::string, int32_t> id_of;
  for (size_t id = 0; id < sp.pieces.size(); id++)
    if (!id_of.emplace(sp.pieces[id], int32_t(id)).second) fail(model_path, ": piece \"", sp.pieces[id], "\" is defined twice");

  // Added tokens: control pieces (special) and user-defined pieces, then the
  // tokenizer's special tokens and the config's added_tokens_decoder.
  std::map<int64_t, ordered_json> added;
  for (size_t id = 0; id < sp.pieces.size(); id++) {
    if (sp.types[id] == 3) added[int64_t(id)] = added_token(int64_t(id), sp.pieces[id], false, true);
    if (sp.types[id] == 4) added[int64_t(id)] = added_token(int64_t(id), sp.pieces[id], false, false);
  }
  std::map<std::string, int32_t> special_ids;  // content -> id of bos/eos/unk/pad
  const std::pair<const char*, const char*> specials[] = {
      {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}, {"pad_token", nullptr}};
  for (const auto& [key, fallback] : specials) {
    std::string content = cfg.contains(key) ? token_content(cfg[key]) : (fallback ? fallback : "");
    if (content.empty()) continue;
    auto it = id_of.find(content);
    if (it == id_of.end()) continue;  // transformers would append it; configs monet handles never need that
    special_ids[content] = it->second;
    auto a = added.find(it->second);
    if (a == added.end()) added[it->second] = added_token(it->second, content, false, true);
    else (*a).second["special"] = true;
  }
  if (cfg.contains("added_tokens_decoder")) {
    if (!cfg["added_tokens_decoder"].is_object()) fail(config_path, ": \"added_tokens_decoder\" must be an object");
    for (auto& [key, a] : cfg["added_tokens_decoder"].items()) {
      int64_t id = -1;
      try {
        id = std::stoll(key);
      } catch (const std::logic_error&) {
      }
      const std::string content = token_content(a);
      if (id < 0 || id >= (int64_t(1) << 24) || content.empty() || !a.is_object())
        fail(config_path, ": bad added_tokens_decoder entry \"", key, "\"");
      if (size_t(id) < sp.pieces.size() && sp.pieces[size_t(id)] != content)
        fail(config_path, ": added_tokens_decoder entry ", id, " is \"", content, "\" but the model's piece ", id,
             " is \"", sp.pieces[size_t(id)], "\"");
      const bool special = a.value("special", false);
      added[id] = added_token(id, content, a.value("normalized", !special), special, a.value("lstrip", false),
                              a.value("rstrip", false), a.value("single_word", false));
    }
  }

  ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = ordered_json::array();
  for (auto& [id, a] : added) j["added_tokens"].push_back(a);

  const std::string mark = utf8::kSpaceMark;
  if (legacy) {  // "▁" before the text, spaces as "▁"
    ordered_json seq = ordered_json::array();
    if (add_prefix_space) seq.push_back({{"type", "Prepend"}, {"prepend", mark}});
    seq.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", mark}});
    j["normalizer"] = {{"type", "Sequence"}, {"normalizers", seq}};
    j["pre_tokenizer"] = nullptr;
  } else {  // non-legacy: no "▁" after special tokens
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = {{"type", "Metaspace"},
                          {"replacement", mark},
                          {"prepend_scheme", add_prefix_space ? "first" : "never"},
                          {"split", false}};
  }

  // TemplateProcessing as LlamaTokenizerFast.update_post_processor builds it.
  const std::string bos = cfg.contains("bos_token") ? token_content(cfg["bos_token"]) : "<s>";
  const std::string eos = cfg.contains("eos_token") ? token_content(cfg["eos_token"]) : "</s>";
  if ((add_bos && !special_ids.count(bos)) || (add_eos && !special_ids.count(eos)))
    fail(config_path, ": add_bos_token / add_eos_token set but the token is not in ", model_path);
  ordered_json single = ordered_json::array(), pair = ordered_json::array(), tokens = ordered_json::object();
  if (add_bos) single.push_back(special_token(bos, 0));
  single.push_back(sequence("A", 0));
  if (add_eos) single.push_back(special_token(eos, 0));
  pair = single;
  if (add_bos) pair.push_back(special_token(bos, 1));
  pair.push_back(sequence("B", 1));
  if (add_eos) pair.push_back(special_token(eos, 1));
  for (const auto& [use, token] : {std::pair{add_bos, bos}, std::pair{add_eos, eos}})
    if (use) tokens[token] = {{"id", token}, {"ids", {special_ids[token]}}, {"tokens", {token}}};
  j["post_processor"] = {{"type", "TemplateProcessing"}, {"single", single}, {"pair", pair}, {"special_tokens", tokens}};

  ordered_json decoders = ordered_json::array();
  decoders.push_back({{"type", "Replace"}, {"pattern", {{"String", mark}}}, {"content", " "}});
  decoders.push_back({{"type", "ByteFallback"}});
  decoders.push_back({{"type", "Fuse"}});
  if (add_prefix_space) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  j["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};

  ordered_json model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = sp.unk_piece;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = true;
  model["byte_fallback"] = true;
  model["ignore_merges"] = false;
  ordered_json vocab = ordered_json::object();
  for (size_t id = 0; id < sp.pieces.size(); id++) vocab[sp.pieces[id]] = id;
  model["vocab"] = vocab;
  // Merges as "left right" strings, which every `tokenizers` release reads
  // (the [left, right] form needs 0.20+, newer than transformers 4.44's);
  // the pair form only where a piece has a space.
  const std::vector<Merge> merges = recover_merges(sp.pieces, scores);
  bool spaced = false;
  for (const Merge& m : merges)
    spaced = spaced || sp.pieces[size_t(m.left)].find(' ') != std::string::npos ||
             sp.pieces[size_t(m.right)].find(' ') != std::string::npos;
  ordered_json merge_list = ordered_json::array();
  for (const Merge& m : merges) {
    const std::string& l = sp.pieces[size_t(m.left)];
    const std::string& r = sp.pieces[size_t(m.right)];
    if (spaced) merge_list.push_back({l, r});
    else merge_list.push_back(l + " " + r);
  }
  model["merges"] = merge_list;
  j["model"] = model;
  try {
    return j.dump(2, ' ', false, json::error_handler_t::strict) + "\n";
  } catch (const json::exception& e) {
    fail(model_path, ": a piece is not valid UTF-8 (", e.what(), ")");
  }
}

}  // namespace monet
