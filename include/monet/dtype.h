// Element types: the safetensors dtypes plus block-quantized weight types,
// described by one traits table (size, block, conversion to and from float32).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>

namespace monet {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, Q8_0 };

// What the code needs to know about a dtype. Scalar types have blocks of one
// element; a block-quantized type stores `block_elems` values in
// `block_bytes` bytes (Q8_0: 32 int8 values and one F16 scale, 34 bytes).
struct DTypeTraits {
  DType type;
  const char* name;      // safetensors spelling ("F32", "BF16"); "Q8_0" for ours
  int64_t block_elems;   // elements per block
  size_t block_bytes;    // bytes per block
  bool weight;           // a weight type the kernels read (F32, F16, BF16, Q8_0)
  // n elements (a multiple of block_elems) from/to float32; null for integer types.
  void (*to_f32)(const void* src, float* dst, int64_t n);
  void (*from_f32)(const float* src, void* dst, int64_t n);
};

const DTypeTraits& dtype_traits(DType t);
bool dtype_from_name(std::string_view name, DType* out);  // false when unknown

inline const char* dtype_name(DType t) { return dtype_traits(t).name; }
// Bytes of one element of a scalar type (0 for block types: use dtype_row_bytes).
size_t dtype_size(DType t);
// Bytes of n elements; n must be a multiple of the block size (else 0).
size_t dtype_row_bytes(DType t, int64_t n);

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);  // round to nearest even

// Q8_0 block: d = max|x| / 127 (stored as F16), q = round(x / d); x ~ d * q.
constexpr int64_t kQ8Block = 32;
// 1 / d, the factor that quantizes a block of scale d, or 0 where that is
// not finite (d = 0, or a block of values under 127 FLT_MIN: they quantize
// to 0, where inf * x would be undefined in an int8 cast)
inline float q8_inverse_scale(float d) { return d >= std::numeric_limits<float>::min() ? 1.0f / d : 0.0f; }
struct BlockQ8_0 {
  uint16_t d;         // F16 scale
  int8_t q[kQ8Block];
};
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 blocks are packed: 2 + 32 bytes");

}  // namespace monet
