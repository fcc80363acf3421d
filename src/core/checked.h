// Overflow-safe size arithmetic for sizes and counts that come from outside
// (config fields, options, file headers): saturating at UINT64_MAX, so that a
// product of absurd factors compares as "too large" instead of wrapping.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <limits>

namespace monet {

constexpr uint64_t kSaturated = std::numeric_limits<uint64_t>::max();

inline uint64_t sat_mul(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_mul_overflow(a, b, &r) ? kSaturated : r;
}

inline uint64_t sat_add(uint64_t a, uint64_t b) {
  uint64_t r;
  return __builtin_add_overflow(a, b, &r) ? kSaturated : r;
}

// The product of all factors (negative factors count as 0: callers check signs).
inline uint64_t sat_product(std::initializer_list<int64_t> factors) {
  uint64_t r = 1;
  for (int64_t f : factors) r = sat_mul(r, f < 0 ? 0 : uint64_t(f));
  return r;
}

}  // namespace monet
