// SentencePiece's ModelProto (tokenizer.model) as read from the file: the
// pieces and the trainer / normalizer settings the tokenizer and the
// tokenizer.json converter need. No checks beyond the wire format here.
#pragma once
#include <string>
#include <vector>

namespace monet {

struct SentencePieceModel {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int> types;  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
  int model_type = 1;      // 1 UNIGRAM (the proto default), 2 BPE
  std::string unk_piece = "<unk>";
  bool byte_fallback = true;  // as LLaMA's models set it (absent only in old files)
  bool treat_whitespace_as_suffix = false;
  std::string normalizer_name;
  size_t charsmap_bytes = 0;  // precompiled_charsmap size (0: none)
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
};

// Throws monet::Error naming `path` when the file is not a ModelProto.
SentencePieceModel read_sentencepiece_model(const std::string& path);

}  // namespace monet
