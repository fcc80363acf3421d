// Tokenizers of LLaMA-family checkpoints: HF tokenizer.json (BPE with byte
// fallback) and SentencePiece tokenizer.model (BPE), encoded as Hugging Face
// `transformers` does (AutoTokenizer(dir)(text).input_ids), with the merges
// computed exactly as the reference libraries do (HF `tokenizers`: merge
// ranks; `sentencepiece`: piece scores).
//
// Supported: tokenizer.json with model BPE (byte_fallback, unk, fuse_unk,
// ignore_merges; merges as "a b" or [a, b]), normalizers Prepend/Replace (and
// a Sequence of them), pre-tokenizer Metaspace (prepend_scheme always/first/
// never, split or not), decoders Replace/ByteFallback/Fuse/Strip/Metaspace,
// post-processor TemplateProcessing, added tokens with lstrip/rstrip/
// single_word/normalized/special. tokenizer.model: SentencePiece BPE with the
// identity normalizer and remove_extra_whitespaces off (as LLaMA). Anything
// else (WordPiece, Unigram, byte-level BPE, NFKC...) is refused at load with
// a monet::Error naming the file and the unsupported part.
#pragma once
#include <array>
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
  // add_eos_token, bos/eos tokens, legacy and the chat template.
  static std::unique_ptr<Tokenizer> load_dir(const std::string& dir);
  static std::unique_ptr<Tokenizer> load_hf_json(const std::string& path);
  static std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);
  ~Tokenizer();

  // Token ids of `text` (HF `tokenizer(text).input_ids`): added and special
  // tokens written in the text ("<s>", "[INST]") become their ids, as HF
  // does; add_special adds BOS/EOS as the tokenizer config says.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // encode(text, false); kept for rendered chat prompts.
  std::vector<int32_t> encode_with_specials(std::string_view text) const { return encode(text, false); }
  // Text of `ids`; skip_special drops special tokens (BOS, EOS, ...).
  // tokenizer.json: as HF `tokenizers` decode; tokenizer.model: as
  // `sentencepiece` decode (but unk is special, so skipped as HF skips it).
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
  // split character) as U+FFFD, special tokens that add no text by name ("<s>").
  std::string token_text(int32_t id) const;

 private:
  friend class TokenizerBuilder;
  friend class StreamDecoder;
  Tokenizer() = default;

  struct AddedToken {
    std::string pattern;  // what is matched (for normalized tokens: the normalized content)
    int32_t id;
    bool lstrip, rstrip, single_word;
  };
  // Added tokens found in text leftmost-longest (as HF's Aho-Corasick), indexed by first byte.
  struct AddedSet {
    std::vector<AddedToken> tokens;
    std::array<std::vector<uint32_t>, 256> by_first_byte;  // longest first
    void index();
    bool empty() const { return tokens.empty(); }
  };
  // Calls on_text(segment, offset in text) for the text between matches and
  // on_token(id) for each match, in order.
  template <class OnText, class OnToken>
  static void split_added(const AddedSet& set, std::string_view text, OnText&& on_text, OnToken&& on_token);

  std::string normalize(std::string_view raw) const;
  void encode_raw_segment(std::string_view raw, bool at_start, std::vector<int32_t>& out) const;
  void pre_tokenize(std::string_view normalized, bool at_start, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  int byte_value(int32_t id) const;  // the byte of a byte-fallback token, else -1
  bool sp_control(int32_t id) const;

  enum class Kind { HfBpe, SentencePieceBpe };
  Kind kind_ = Kind::HfBpe;
  std::string source_;
  std::vector<std::string> pieces_;
  std::vector<uint8_t> special_;                       // [vocab] special (skipped in decode)
  std::vector<int16_t> byte_values_;                   // [vocab] byte of "<0xNN>" tokens, else -1
  std::unordered_map<std::string, int32_t> ids_;       // every piece, added tokens included
  std::unordered_map<std::string, int32_t> vocab_;     // the BPE model's own pieces
  std::unordered_map<std::string, int32_t> mergeable_; // SentencePiece: pieces BPE may form
  std::vector<float> scores_;                          // SentencePiece scores
  std::vector<uint8_t> unused_;                        // SentencePiece UNUSED pieces (resegmented)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // HF: (a,b) -> (rank, id)
  int32_t byte_ids_[256];                              // byte-fallback token of each byte, or -1
  bool byte_fallback_ = true;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = true;

  // HF: added tokens with normalized=false are found in the raw text, the
  // others in each normalised segment; SentencePiece checkpoints as HF's
  // conversion: control, unknown and user-defined pieces in the raw text.
  AddedSet raw_added_, normalized_added_;

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
  std::string decode_metaspace_char_ = "\xe2\x96\x81";  // the Metaspace decoder's replacement
  bool decode_bytes_ = true;  // <0xNN> tokens decode to their byte (HF: a ByteFallback decoder)
  // What happens at the start of decoded text: HF's Strip decoder drops one
  // leading space of the whole text; HF's Metaspace decoder drops every
  // metaspace character of the first token; SentencePiece drops the dummy
  // prefix "▁" of the first piece when it is a normal piece.
  enum class Leading { Keep, StripOneSpace, DropFirstTokenMarks, SentencePiecePrefix } leading_ = Leading::Keep;

  std::vector<int32_t> prefix_ids_, suffix_ids_;  // added by encode(add_special)
  int32_t bos_id_ = -1, eos_id_ = -1;
  std::string chat_template_;
};

// The tokenizer.json that transformers makes of a SentencePiece BPE
// tokenizer.model (LlamaTokenizerFast converting it with LlamaConverter, then
// save_pretrained), for the tokenizer_config.json beside it (legacy,
// add_prefix_space, add_bos_token / add_eos_token, added_tokens_decoder).
// With it, AutoTokenizer needs neither sentencepiece nor protobuf.
std::string sentencepiece_to_tokenizer_json(const std::string& model_path);

// Incremental detokenizer: feed ids one at a time, get text as soon as it is
// final: a character split over byte-fallback tokens is held back until
// complete (with tokenizer.json, a run of byte tokens until it ends, since HF
// turns a whole run with an invalid byte into U+FFFDs). The concatenated
// output of feed() and flush() equals Tokenizer::decode of all ids fed.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true) : tok_(tok), skip_special_(skip_special) {}
  std::string feed(int32_t id);
  std::string flush();  // whatever is held back (at the end of the ids)

 private:
  std::string emit(std::string bytes);  // appends to pending_, returns the complete characters
  std::string end_byte_run();

  const Tokenizer& tok_;
  bool skip_special_;
  bool first_token_ = true;  // the next token is the text's first
  bool started_ = false;     // some text has been produced (the Strip rule is applied)
  std::string byte_run_;     // HF: bytes of consecutive byte tokens, not yet resolved
  std::string pending_;      // an incomplete UTF-8 character
};

}  // namespace monet
