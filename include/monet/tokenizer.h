// Tokenizers of LLaMA-family checkpoints: HF tokenizer.json (BPE with byte
// fallback) and SentencePiece tokenizer.model (BPE), encoded exactly as the
// reference libraries (HF `tokenizers`, `sentencepiece`) do.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace monet {

class Tokenizer {
 public:
  // A checkpoint directory: tokenizer.json when present (as HF prefers it),
  // else tokenizer.model; tokenizer_config.json sets add_bos_token /
  // add_eos_token, bos/eos tokens and the chat template.
  static std::unique_ptr<Tokenizer> load_dir(const std::string& dir);
  static std::unique_ptr<Tokenizer> load_hf_json(const std::string& path);
  static std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);
  ~Tokenizer();

  // Token ids of `text`; add_special adds BOS/EOS as the tokenizer config says
  // (HF `tokenizer(text).input_ids`).
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // Like encode(text, false), but special-token strings in the text ("<s>",
  // "</s>", control tokens) become their ids also with a SentencePiece model
  // (tokenizer.json tokenizers do this anyway): for rendered chat prompts.
  std::vector<int32_t> encode_with_specials(std::string_view text) const;
  // Text of `ids`; skip_special drops special tokens (BOS, EOS, ...).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const;

  const std::string& piece(int32_t id) const;  // the vocabulary entry ("▁Hello", "<0x0A>")
  int32_t vocab_size() const { return int32_t(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  bool is_special(int32_t id) const;
  int32_t token_id(const std::string& piece) const;  // -1 if absent
  const std::string& chat_template() const { return chat_template_; }
  const std::string& source() const { return source_; }

  // Bytes one token contributes to decoded text (byte-fallback tokens as raw
  // bytes; ids beyond the vocabulary: nothing); `first`: it is the first
  // token of the text (leading-space rules).
  std::string token_bytes(int32_t id, bool first = false) const;
  // A token's text for display: spaces kept, invalid UTF-8 (a lone byte of a
  // split character) as U+FFFD.
  std::string token_text(int32_t id) const;
  bool strips_one_leading_space() const { return leading_ == Leading::StripOneSpace; }

 private:
  friend class TokenizerBuilder;
  Tokenizer() = default;
  struct Symbol;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view text, bool first_segment, std::vector<int32_t>& out) const;

  enum class Kind { HfBpe, SentencePieceBpe };
  Kind kind_ = Kind::HfBpe;
  std::string source_;
  std::vector<std::string> pieces_;
  std::vector<uint8_t> special_;                       // [vocab] special (skipped in decode)
  std::unordered_map<std::string, int32_t> ids_;       // every piece
  std::unordered_map<std::string, int32_t> mergeable_; // SentencePiece: pieces BPE may form
  std::vector<float> scores_;                          // SentencePiece scores
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // HF: (a,b) -> (rank, id)
  int32_t byte_ids_[256];
  bool byte_fallback_ = true;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = true;

  struct AddedToken {
    std::string content;
    int32_t id;
    bool lstrip, rstrip;
  };
  std::vector<AddedToken> added_;  // matched in the raw text before anything else

  // Normalisation of each text segment (HF normalizer + Metaspace pre-tokenizer;
  // SentencePiece: dummy prefix + whitespace escape).
  std::string prepend_;            // Prepend normalizer ("▁" in LLaMA's tokenizer.json)
  std::vector<std::pair<std::string, std::string>> replacements_;  // Replace normalizers
  bool metaspace_ = false;
  std::string metaspace_char_ = "\xe2\x96\x81";  // ▁
  enum class Prepend { Always, First, Never } metaspace_prepend_ = Prepend::Always;
  bool metaspace_split_ = false;

  // Decoding
  std::vector<std::pair<std::string, std::string>> decode_replacements_;
  bool decode_bytes_ = true;  // <0xNN> tokens decode to their byte (HF: a ByteFallback decoder)
  // What happens at the start of decoded text: HF's Strip decoder and
  // SentencePiece drop one leading space; HF's Metaspace decoder drops every
  // metaspace character of the first token.
  enum class Leading { Keep, StripOneSpace, DropFirstTokenMarks } leading_ = Leading::Keep;

  std::vector<int32_t> prefix_ids_, suffix_ids_;  // added by encode(add_special)
  int32_t bos_id_ = -1, eos_id_ = -1;
  std::string chat_template_;
};

// Incremental detokenizer: feed ids one at a time, get text as soon as it is
// complete UTF-8 (a character split over byte-fallback tokens is held back).
// The concatenated output equals Tokenizer::decode of all ids fed.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true) : tok_(tok), skip_special_(skip_special) {}
  std::string feed(int32_t id);
  std::string flush();  // whatever is held back, invalid bytes as U+FFFD

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  bool first_token_ = true;  // the next token is the text's first
  bool stripped_ = false;    // the leading-space rule has been applied
  std::string pending_;
};

}  // namespace monet
