// Encoding (added tokens, normalisation, BPE) and decoding (whole and
// streamed) of monet::Tokenizer. Loading is in load.cpp.
#include "monet/tokenizer.h"

#include <algorithm>
#include <climits>
#include <queue>

#include "monet/error.h"
#include "tokenizer/utf8.h"

namespace monet {

namespace {

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty() || s.find(from) == std::string::npos) return;
  std::string out;
  size_t pos = 0;
  for (size_t at; (at = s.find(from, pos)) != std::string::npos; pos = at + from.size()) {
    out.append(s, pos, at - pos);
    out += to;
  }
  out.append(s, pos);
  s.swap(out);
}

}  // namespace

Tokenizer::~Tokenizer() = default;

const std::string& Tokenizer::piece(int32_t id) const {
  if (id < 0 || size_t(id) >= pieces_.size())
    fail(source_, ": token id ", id, " is outside the vocabulary [0, ", pieces_.size(), ")");
  return pieces_[size_t(id)];
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && size_t(id) < special_.size() && special_[size_t(id)]; }

int32_t Tokenizer::token_id(const std::string& p) const {
  auto it = ids_.find(p);
  return it == ids_.end() ? -1 : it->second;
}

int Tokenizer::byte_value(int32_t id) const {
  if (!decode_bytes_ || id < 0 || size_t(id) >= byte_values_.size()) return -1;
  return byte_values_[size_t(id)];
}

bool Tokenizer::sp_control(int32_t id) const { return kind_ == Kind::SentencePieceBpe && is_special(id) && id != unk_id_; }

// ---- added tokens -----------------------------------------------------------

void Tokenizer::AddedSet::index() {
  for (auto& bucket : by_first_byte) bucket.clear();
  for (uint32_t k = 0; k < tokens.size(); k++)
    if (!tokens[k].pattern.empty()) by_first_byte[static_cast<unsigned char>(tokens[k].pattern[0])].push_back(k);
  for (auto& bucket : by_first_byte)
    std::stable_sort(bucket.begin(), bucket.end(),
                     [&](uint32_t a, uint32_t b) { return tokens[a].pattern.size() > tokens[b].pattern.size(); });
}

// Leftmost-longest matching with HF's rules: a single_word match next to a
// word character is dropped (and its text left to the model), lstrip/rstrip
// take the white space beside the token into it.
template <class OnText, class OnToken>
void Tokenizer::split_added(const AddedSet& set, std::string_view text, OnText&& on_text, OnToken&& on_token) {
  size_t seg_start = 0;  // start of the text not yet passed on
  size_t i = 0;
  while (!set.empty() && i < text.size()) {
    const AddedToken* best = nullptr;
    for (uint32_t k : set.by_first_byte[static_cast<unsigned char>(text[i])]) {
      const AddedToken& a = set.tokens[k];
      if (text.compare(i, a.pattern.size(), a.pattern) == 0) {
        best = &a;  // the bucket is sorted longest first
        break;
      }
    }
    if (!best) {
      i++;
      continue;
    }
    size_t start = i, stop = i + best->pattern.size(), len = 0;
    if (best->single_word) {
      const bool word_before = start > 0 && utf8::is_word_char(utf8::code_point(text, utf8::prev_char_start(text, start), &len));
      const bool word_after = stop < text.size() && utf8::is_word_char(utf8::code_point(text, stop, &len));
      if (word_before || word_after) {
        i = stop;  // as HF's non-overlapping search: the text of a dropped match is not searched again
        continue;
      }
    }
    if (best->lstrip)
      while (start > seg_start) {
        const size_t p = utf8::prev_char_start(text, start);
        if (!utf8::is_space(utf8::code_point(text, p, &len))) break;
        start = p;
      }
    if (best->rstrip)
      while (stop < text.size() && utf8::is_space(utf8::code_point(text, stop, &len))) stop += len;
    if (seg_start < start) on_text(text.substr(seg_start, start - seg_start), seg_start);
    on_token(best->id);
    seg_start = i = stop;
  }
  if (seg_start < text.size()) on_text(text.substr(seg_start), seg_start);
}

// ---- encoding -----------------------------------------------------------------

std::string Tokenizer::normalize(std::string_view raw) const {
  std::string s;
  if (raw.empty()) return s;
  s.reserve(prepend_.size() + raw.size() + raw.size() / 4);
  s = prepend_;
  s += raw;
  for (const auto& [from, to] : replacements_) replace_all(s, from, to);
  return s;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  // Text is UTF-8; invalid bytes become U+FFFD (as SentencePiece's normaliser
  // does; HF cannot be given them at all).
  std::string cleaned;
  if (!utf8::is_valid(text)) {
    utf8::append_sanitized(cleaned, text);
    text = cleaned;
  }
  std::vector<int32_t> out;
  if (add_special) out = prefix_ids_;
  split_added(
      raw_added_, text, [&](std::string_view seg, size_t offset) { encode_raw_segment(seg, offset == 0, out); },
      [&](int32_t id) { out.push_back(id); });
  if (add_special) out.insert(out.end(), suffix_ids_.begin(), suffix_ids_.end());
  return out;
}

// A stretch of text between added tokens: normalised on its own (the legacy
// LLaMA behaviour: every stretch gets the "▁" prefix), then split at the
// normalized added tokens.
void Tokenizer::encode_raw_segment(std::string_view raw, bool at_start, std::vector<int32_t>& out) const {
  if (raw.empty()) return;
  const std::string text = normalize(raw);
  split_added(
      normalized_added_, text,
      [&](std::string_view piece, size_t offset) { pre_tokenize(piece, at_start && offset == 0, out); },
      [&](int32_t id) { out.push_back(id); });
}

// HF's Metaspace pre-tokenizer (spaces to "▁", a "▁" prefix, words that begin
// at each "▁"), then BPE of each word.
void Tokenizer::pre_tokenize(std::string_view normalized, bool at_start, std::vector<int32_t>& out) const {
  if (!metaspace_) {
    bpe(normalized, out);
    return;
  }
  std::string text(normalized);
  replace_all(text, " ", metaspace_char_);
  const bool starts = text.compare(0, metaspace_char_.size(), metaspace_char_) == 0;
  if (!starts && (metaspace_prepend_ == Prepend::Always || (metaspace_prepend_ == Prepend::First && at_start)))
    text.insert(0, metaspace_char_);
  if (!metaspace_split_) {
    bpe(text, out);
    return;
  }
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
}

namespace {

struct Symbol {
  size_t start, len;  // bytes of the word
  int32_t id;         // HF: the symbol's token id
  int prev, next;     // neighbours in the word (-1: none)
};

// A candidate merge of two adjacent symbols. Best first: HF the lowest merge
// rank, SentencePiece the highest piece score; leftmost on ties (both libraries).
struct Candidate {
  double priority;  // lower is better
  int left, right;
  size_t left_len, right_len;  // to recognise candidates made stale by other merges
  int32_t id;
  bool operator<(const Candidate& o) const { return priority > o.priority || (priority == o.priority && left > o.left); }
};

}  // namespace

// BPE of one word: symbols start as characters and the best adjacent pair is
// merged until none merges; O(n log n) with a heap of candidate pairs and a
// linked list of symbols.
void Tokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (word.size() > size_t(INT32_MAX)) fail(source_, ": a word of ", word.size(), " bytes is too long to encode");
  const bool hf = kind_ == Kind::HfBpe;
  if (hf && ignore_merges_) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  auto add_symbol = [&](size_t start, size_t len, int32_t id) {
    sym.push_back({start, len, id, int(sym.size()) - 1, int(sym.size()) + 1});
  };
  std::string key;
  for (size_t i = 0; i < word.size();) {
    const size_t n = std::min(utf8::seq_len(static_cast<unsigned char>(word[i])), word.size() - i);
    if (!hf) {  // SentencePiece: characters; unknown ones are resolved after merging
      add_symbol(i, n, -1);
      i += n;
      continue;
    }
    // HF: characters missing from the vocabulary become byte tokens, else unk
    key.assign(word.substr(i, n));
    if (auto it = vocab_.find(key); it != vocab_.end()) {
      add_symbol(i, n, it->second);
      i += n;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (size_t k = 0; k < n; k++) all &= byte_ids_[static_cast<unsigned char>(word[i + k])] >= 0;
      if (all) {
        for (size_t k = 0; k < n; k++) add_symbol(i + k, 1, byte_ids_[static_cast<unsigned char>(word[i + k])]);
        i += n;
        continue;
      }
    }
    if (unk_id_ < 0) fail(source_, ": cannot encode a character and the tokenizer has no unk token");
    if (fuse_unk_ && !sym.empty() && sym.back().id == unk_id_)
      sym.back().len += n;
    else
      add_symbol(i, n, unk_id_);
    i += n;
  }
  sym.back().next = -1;

  std::priority_queue<Candidate> queue;
  auto consider = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const Symbol& a = sym[size_t(l)];
    const Symbol& b = sym[size_t(r)];
    if (hf) {
      const uint64_t k = (uint64_t(uint32_t(a.id)) << 32) | uint32_t(b.id);
      auto it = merges_.find(k);
      if (it != merges_.end()) queue.push({double(it->second.first), l, r, a.len, b.len, it->second.second});
    } else {
      key.assign(word.substr(a.start, a.len + b.len));
      auto it = mergeable_.find(key);
      if (it != mergeable_.end()) queue.push({-double(scores_[size_t(it->second)]), l, r, a.len, b.len, it->second});
    }
  };
  for (size_t i = 0; i + 1 < sym.size(); i++) consider(int(i), int(i + 1));
  // SentencePiece: an UNUSED piece may be formed by a merge but is then split
  // back into the two symbols it was made of.
  std::unordered_map<std::string, std::pair<std::string, std::string>> unmerge;
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& l = sym[size_t(c.left)];
    Symbol& r = sym[size_t(c.right)];
    if (l.len != c.left_len || r.len != c.right_len || l.next != c.right) continue;  // stale
    if (!hf && !unused_.empty() && unused_[size_t(c.id)])
      unmerge[std::string(word.substr(l.start, l.len + r.len))] = {std::string(word.substr(l.start, l.len)),
                                                                    std::string(word.substr(r.start, r.len))};
    l.len += r.len;
    l.id = c.id;
    l.next = r.next;
    if (r.next >= 0) sym[size_t(r.next)].prev = c.left;
    r.len = 0;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
  if (hf) {
    for (int i = 0; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
    return;
  }
  // SentencePiece: pieces, unused ones split back, unknown ones as bytes or one unk per run
  auto emit_piece = [&](auto&& self, const std::string& p) -> void {
    auto it = ids_.find(p);
    if (it != ids_.end() && size_t(it->second) < unused_.size() && unused_[size_t(it->second)]) {
      auto u = unmerge.find(p);
      if (u != unmerge.end()) {
        self(self, u->second.first);
        self(self, u->second.second);
        return;
      }
    }
    if (it != ids_.end()) {
      out.push_back(it->second);
      return;
    }
    bool bytes_ok = byte_fallback_;
    for (unsigned char ch : p) bytes_ok = bytes_ok && byte_ids_[ch] >= 0;
    if (bytes_ok) {
      for (unsigned char ch : p) out.push_back(byte_ids_[ch]);
      return;
    }
    if (unk_id_ < 0) fail(source_, ": cannot encode a character and the model has no unknown piece");
    if (out.empty() || out.back() != unk_id_) out.push_back(unk_id_);  // SentencePiece merges adjacent unknowns
  };
  for (int i = 0; i >= 0; i = sym[size_t(i)].next) {
    const Symbol& s = sym[size_t(i)];
    emit_piece(emit_piece, std::string(word.substr(s.start, s.len)));
  }
}

// ---- decoding -----------------------------------------------------------------

std::string Tokenizer::token_bytes(int32_t id, bool first) const {
  // Models may have more embedding rows than the tokenizer has pieces
  // (padded vocabularies); such ids decode to nothing, as in HF.
  if (id < 0 || size_t(id) >= pieces_.size()) return "";
  const int b = byte_value(id);
  if (b >= 0) return std::string(1, char(b));
  if (kind_ == Kind::SentencePieceBpe && special_[size_t(id)]) return id == unk_id_ ? " \xe2\x81\x87 " : "";
  std::string s = pieces_[size_t(id)];
  if (first && leading_ == Leading::DropFirstTokenMarks) replace_all(s, decode_metaspace_char_, "");
  if (first && leading_ == Leading::SentencePiecePrefix && s.compare(0, utf8::kSpaceMark.size(), utf8::kSpaceMark) == 0)
    s.erase(0, utf8::kSpaceMark.size());
  for (const auto& [from, to] : decode_replacements_) replace_all(s, from, to);
  return s;
}

std::string Tokenizer::token_text(int32_t id) const {
  std::string out;
  utf8::append_sanitized(out, token_bytes(id, false));
  // Control tokens (SentencePiece's <s>, </s>) add no text but are shown by name.
  if (out.empty() && id >= 0 && size_t(id) < pieces_.size() && is_special(id)) utf8::append_sanitized(out, pieces_[size_t(id)]);
  return out;
}

// Decoding is the streaming decoder run to the end, so the two always agree.
std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  StreamDecoder stream(*this, skip_special);
  std::string out;
  for (int32_t id : ids) out += stream.feed(id);
  out += stream.flush();
  return out;
}

std::string StreamDecoder::feed(int32_t id) {
  if (skip_special_ && tok_.is_special(id)) return "";
  // SentencePiece control pieces decode to nothing and leave the next piece "first"
  if (tok_.sp_control(id)) return "";
  const bool first = first_token_;
  first_token_ = false;
  const int b = tok_.byte_value(id);
  if (b >= 0 && tok_.kind_ == Tokenizer::Kind::HfBpe) {
    byte_run_ += char(b);  // resolved when the run ends
    return "";
  }
  std::string out = end_byte_run();
  out += emit(tok_.token_bytes(id, first));
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = end_byte_run();
  utf8::append_sanitized(out, pending_);
  pending_.clear();
  return out;
}

// HF's ByteFallback decoder: a run of byte tokens is its bytes if they are
// valid UTF-8, else one U+FFFD per token.
std::string StreamDecoder::end_byte_run() {
  if (byte_run_.empty()) return "";
  std::string text;
  if (utf8::is_valid(byte_run_)) {
    text.swap(byte_run_);
  } else {
    for (size_t k = 0; k < byte_run_.size(); k++) text += utf8::kReplacementChar;
  }
  byte_run_.clear();
  return emit(std::move(text));
}

std::string StreamDecoder::emit(std::string bytes) {
  if (!started_ && !bytes.empty()) {
    // HF's Strip decoder: one leading space of the whole text
    if (tok_.leading_ == Tokenizer::Leading::StripOneSpace && bytes[0] == ' ') bytes.erase(0, 1);
    started_ = true;
  }
  pending_ += bytes;
  // Complete characters go out; an incomplete one at the end waits for the
  // next bytes; invalid bytes become U+FFFD one each (SentencePiece's rule).
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const int n = utf8::valid_char_len(pending_, i);
    if (n == 0) break;
    if (n < 0) {
      out += utf8::kReplacementChar;
      i++;
    } else {
      out.append(pending_, i, size_t(n));
      i += size_t(n);
    }
  }
  pending_.erase(0, i);
  return out;
}

}  // namespace monet
