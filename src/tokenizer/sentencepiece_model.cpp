// A minimal protobuf wire-format reader for SentencePiece's ModelProto.
#include "tokenizer/sentencepiece_model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {
namespace {

struct ProtoReader {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& src;

  ProtoReader(std::string_view bytes, const std::string& source)
      : p(reinterpret_cast<const uint8_t*>(bytes.data())), end(p + bytes.size()), src(source) {}
  bool done() const { return p >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) fail(src, ": truncated protobuf (not a SentencePiece model?)");
      const uint8_t b = *p++;
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(src, ": malformed protobuf varint (not a SentencePiece model?)");
  }
  uint32_t key(uint32_t* wire) {  // field number; sets the wire type
    const uint64_t k = varint();
    *wire = uint32_t(k & 7);
    return uint32_t(k >> 3);
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    if (n > uint64_t(end - p)) fail(src, ": truncated protobuf field (not a SentencePiece model?)");
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
      default: fail(src, ": unsupported protobuf wire type ", wire, " (not a SentencePiece model?)");
    }
  }
};

}  // namespace

// Vocabularies beyond this are not tokenizers but damage (ids are int32 and
// per-piece tables are allocated from the count).
constexpr int64_t kMaxPieces = int64_t(1) << 24;

SentencePieceModel read_sentencepiece_model(const std::string& path) {
  const std::string data = read_file(path);
  SentencePieceModel m;
  ProtoReader r(data, path);
  while (!r.done()) {
    uint32_t wire;
    const uint32_t field = r.key(&wire);
    if (field == 1 && wire == 2) {  // repeated SentencePiece pieces
      ProtoReader pr(r.bytes(), path);
      std::string piece;
      float score = 0;
      uint64_t type = 1;  // NORMAL
      while (!pr.done()) {
        uint32_t w;
        const uint32_t f = pr.key(&w);
        if (f == 1 && w == 2) piece = std::string(pr.bytes());
        else if (f == 2 && w == 5) score = pr.f32();
        else if (f == 3 && w == 0) type = pr.varint();
        else pr.skip(w);
      }
      const size_t id = m.pieces.size();
      if (int64_t(id) >= kMaxPieces) fail(path, ": more than ", kMaxPieces, " pieces");
      if (type < 1 || type > 6) fail(path, ": piece ", id, " has unknown type ", type);
      if (!std::isfinite(score)) fail(path, ": piece ", id, " has score ", score, "; scores must be finite");
      m.pieces.push_back(piece);
      m.scores.push_back(score);
      m.types.push_back(int(type));
    } else if (field == 2 && wire == 2) {  // TrainerSpec
      ProtoReader tr(r.bytes(), path);
      while (!tr.done()) {
        uint32_t w;
        const uint32_t f = tr.key(&w);
        if (f == 3 && w == 0) m.model_type = int(std::min<uint64_t>(tr.varint(), 1000));  // 1000: "unsupported"
        else if (f == 24 && w == 0) m.treat_whitespace_as_suffix = tr.varint() != 0;
        else if (f == 35 && w == 0) m.byte_fallback = tr.varint() != 0;
        else if (f == 45 && w == 2) m.unk_piece = std::string(tr.bytes());
        else tr.skip(w);
      }
    } else if (field == 3 && wire == 2) {  // NormalizerSpec
      ProtoReader nr(r.bytes(), path);
      while (!nr.done()) {
        uint32_t w;
        const uint32_t f = nr.key(&w);
        if (f == 1 && w == 2) m.normalizer_name = std::string(nr.bytes());
        else if (f == 2 && w == 2) m.charsmap_bytes = nr.bytes().size();
        else if (f == 3 && w == 0) m.add_dummy_prefix = nr.varint() != 0;
        else if (f == 4 && w == 0) m.remove_extra_whitespaces = nr.varint() != 0;
        else if (f == 5 && w == 0) m.escape_whitespaces = nr.varint() != 0;
        else nr.skip(w);
      }
    } else {
      r.skip(wire);
    }
  }
  return m;
}

}  // namespace monet
