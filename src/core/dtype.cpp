#include "monet/dtype.h"

#include <algorithm>
#include <cmath>

namespace monet {

namespace {

template <class T>
void plain_to_f32(const void* src, float* dst, int64_t n) {
  const T* s = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; i++) dst[i] = float(s[i]);
}
template <class T>
void plain_from_f32(const float* src, void* dst, int64_t n) {
  T* d = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; i++) d[i] = T(src[i]);
}

void f32_to_f32(const void* src, float* dst, int64_t n) { std::memcpy(dst, src, size_t(n) * 4); }
void f32_from_f32(const float* src, void* dst, int64_t n) { std::memcpy(dst, src, size_t(n) * 4); }

// Source data may be unaligned (a safetensors payload is only byte-aligned).
template <float (*Widen)(uint16_t)>
void half_to_f32(const void* src, float* dst, int64_t n) {
  const uint8_t* s = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; i++) {
    uint16_t h;
    std::memcpy(&h, s + 2 * i, 2);
    dst[i] = Widen(h);
  }
}
template <uint16_t (*Narrow)(float)>
void half_from_f32(const float* src, void* dst, int64_t n) {
  uint8_t* d = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < n; i++) {
    const uint16_t h = Narrow(src[i]);
    std::memcpy(d + 2 * i, &h, 2);
  }
}

void q8_0_to_f32(const void* src, float* dst, int64_t n) {
  const uint8_t* s = static_cast<const uint8_t*>(src);
  for (int64_t b = 0; b < n / kQ8Block; b++) {
    BlockQ8_0 blk;
    std::memcpy(&blk, s + size_t(b) * sizeof(BlockQ8_0), sizeof blk);
    const float d = f16_to_f32(blk.d);
    for (int64_t i = 0; i < kQ8Block; i++) dst[b * kQ8Block + i] = d * float(blk.q[i]);
  }
}

void q8_0_from_f32(const float* src, void* dst, int64_t n) {
  uint8_t* out = static_cast<uint8_t*>(dst);
  for (int64_t b = 0; b < n / kQ8Block; b++) {
    const float* x = src + b * kQ8Block;
    float amax = 0.0f;
    for (int64_t i = 0; i < kQ8Block; i++) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float inv = q8_inverse_scale(d);
    BlockQ8_0 blk;
    blk.d = f32_to_f16(d);
    for (int64_t i = 0; i < kQ8Block; i++) blk.q[i] = int8_t(std::lround(x[i] * inv));
    std::memcpy(out + size_t(b) * sizeof(BlockQ8_0), &blk, sizeof blk);
  }
}

constexpr DTypeTraits kTraits[] = {
    {DType::F64, "F64", 1, 8, false, plain_to_f32<double>, plain_from_f32<double>},
    {DType::F32, "F32", 1, 4, true, f32_to_f32, f32_from_f32},
    {DType::F16, "F16", 1, 2, true, half_to_f32<f16_to_f32>, half_from_f32<f32_to_f16>},
    {DType::BF16, "BF16", 1, 2, true, half_to_f32<bf16_to_f32>, half_from_f32<f32_to_bf16>},
    {DType::I64, "I64", 1, 8, false, nullptr, nullptr},
    {DType::I32, "I32", 1, 4, false, nullptr, nullptr},
    {DType::I16, "I16", 1, 2, false, nullptr, nullptr},
    {DType::I8, "I8", 1, 1, false, nullptr, nullptr},
    {DType::U8, "U8", 1, 1, false, nullptr, nullptr},
    {DType::BOOL, "BOOL", 1, 1, false, nullptr, nullptr},
    {DType::Q8_0, "Q8_0", kQ8Block, sizeof(BlockQ8_0), true, q8_0_to_f32, q8_0_from_f32},
};

}  // namespace

const DTypeTraits& dtype_traits(DType t) {
  for (const DTypeTraits& d : kTraits)
    if (d.type == t) return d;
  return kTraits[1];  // unreachable: every enumerator is in the table
}

bool dtype_from_name(std::string_view name, DType* out) {
  for (const DTypeTraits& d : kTraits)
    if (name == d.name) {
      *out = d.type;
      return true;
    }
  return false;
}

size_t dtype_size(DType t) {
  const DTypeTraits& d = dtype_traits(t);
  return d.block_elems == 1 ? d.block_bytes : 0;
}

size_t dtype_row_bytes(DType t, int64_t n) {
  const DTypeTraits& d = dtype_traits(t);
  if (n < 0 || n % d.block_elems != 0) return 0;
  return size_t(n / d.block_elems) * d.block_bytes;
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
