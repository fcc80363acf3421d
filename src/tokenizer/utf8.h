// UTF-8 helpers shared by the tokenizer's loader and codec.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace monet::utf8 {

inline const std::string kSpaceMark = "\xe2\x96\x81";  // ▁ U+2581
inline const std::string kReplacementChar = "\xef\xbf\xbd";

// Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes).
inline size_t seq_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 1;
}

// Length of a valid UTF-8 character at s[i], 0 if incomplete at the end, -1 if invalid.
inline int valid_char_len(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  const size_t n = seq_len(c);
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

inline bool is_valid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const int n = valid_char_len(s, i);
    if (n <= 0) return false;
    i += size_t(n);
  }
  return true;
}

// Invalid bytes become U+FFFD, one each (as SentencePiece decodes bytes).
inline void append_sanitized(std::string& out, std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const int n = valid_char_len(s, i);
    if (n > 0) {
      out.append(s.substr(i, size_t(n)));
      i += size_t(n);
    } else {
      out += kReplacementChar;
      i++;
    }
  }
}

// Code point of the (valid) character at s[i]; sets len. Invalid bytes: U+FFFD, len 1.
inline uint32_t code_point(std::string_view s, size_t i, size_t* len) {
  const int n = valid_char_len(s, i);
  if (n <= 0) {
    *len = 1;
    return 0xfffd;
  }
  *len = size_t(n);
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (n == 1) return c;
  uint32_t cp = c & (0xff >> (n + 1));
  for (int k = 1; k < n; k++) cp = (cp << 6) | (static_cast<unsigned char>(s[i + size_t(k)]) & 0x3f);
  return cp;
}

// Start of the character that ends just before s[end].
inline size_t prev_char_start(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && end - i < 4 && (static_cast<unsigned char>(s[i]) & 0xc0) == 0x80) i--;
  return i;
}

// Unicode White_Space (Rust regex \s, which HF's lstrip/rstrip use).
inline bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

// Unicode \w (letters, marks, digits, connector punctuation), as HF's
// single_word check uses. Exact for ASCII; beyond it, an approximation
// without Unicode tables: everything is a word character except white space
// and the punctuation/symbol blocks (Latin-1 punctuation, General
// Punctuation to Misc. Symbols and Arrows, CJK punctuation, full-width
// punctuation, emoji).
inline bool is_word_char(uint32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'A' && cp <= 'Z') || (cp >= 'a' && cp <= 'z') || cp == '_';
  if (is_space(cp)) return false;
  if (cp >= 0xa1 && cp <= 0xbf) return cp == 0xaa || cp == 0xb5 || cp == 0xba;
  if (cp == 0xd7 || cp == 0xf7) return false;
  if (cp >= 0x2000 && cp <= 0x2bff)
    return cp == 0x200c || cp == 0x200d || cp == 0x203f || cp == 0x2040 || cp == 0x2054 || (cp >= 0x2070 && cp <= 0x209f) ||
           (cp >= 0x20d0 && cp <= 0x20ff) || (cp >= 0x2100 && cp <= 0x218f) || (cp >= 0x24b6 && cp <= 0x24e9);
  if (cp >= 0x3000 && cp <= 0x303f)
    return (cp >= 0x3005 && cp <= 0x3007) || (cp >= 0x3021 && cp <= 0x302f) || (cp >= 0x3031 && cp <= 0x3035) ||
           cp == 0x303b || cp == 0x303c;
  if ((cp >= 0xff01 && cp <= 0xff0f) || (cp >= 0xff1a && cp <= 0xff20) || (cp >= 0xff3b && cp <= 0xff3e) || cp == 0xff40 ||
      (cp >= 0xff5b && cp <= 0xff65))
    return false;
  if (cp >= 0x1f000 && cp <= 0x1faff) return false;
  return true;
}

}  // namespace monet::utf8
