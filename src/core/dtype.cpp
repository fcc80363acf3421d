#include "monet/dtype.h"

#include <cmath>

namespace monet {

namespace {
struct DTypeName {
  DType type;
  const char* name;
  size_t size;
};
constexpr DTypeName kDTypes[] = {
    {DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2}, {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};
}  // namespace

size_t dtype_size(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.size;
  return 0;
}

const char* dtype_name(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.name;
  return "?";
}

bool dtype_from_name(std::string_view name, DType* out) {
  for (const auto& d : kDTypes)
    if (name == d.name) {
      *out = d.type;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // subnormal: value = mant * 2^-24
    float f = std::ldexp(float(mant), -24);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;          // nan
  if (abs >= 0x477ff000u) return sign | 0x7c00u;         // overflows to inf (>= 65520)
  if (abs < 0x38800000u) {                               // below the smallest normal 2^-14
    // Half subnormal (or zero): the result is round(|f| * 2^24) to nearest
    // even. |f| = mant24 * 2^(exp - 150), so |f| * 2^24 = mant24 >> (126 - exp).
    // Integer arithmetic keeps this independent of the FPU rounding mode.
    const uint32_t exp = abs >> 23;
    if (exp < 102) return sign;  // |f| < 2^-25: rounds to zero (2^-25 itself ties to even 0)
    const uint32_t mant24 = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t r = mant24 >> shift;
    const uint32_t rem = mant24 & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;  // may carry into 0x400, the smallest normal: correct
    return uint16_t(sign | r);
  }
  // normal: rebias exponent, round mantissa to 10 bits (nearest even)
  uint32_t m = abs + 0xfffu + ((abs >> 13) & 1u);
  m -= 112u << 23;
  return sign | uint16_t(m >> 13);
}

}  // namespace monet
