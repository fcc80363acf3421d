// Memory a model needs beyond its memory-mapped weights, and what the machine
// has: a model too large for the machine is refused up front, with the sizes,
// instead of failing in an allocation part-way through loading.
#pragma once
#include <cstdint>
#include <string>

#include "monet/config.h"
#include "monet/dtype.h"

namespace monet {

struct MemoryEstimate {
  // Weights copied at load (the rest stay in the file mapping): expert v
  // matrices transposed (kept BF16, else F32), F16 matrices widened to F32,
  // every vector (norms, biases, BatchNorm buffers) as F32, and the largest
  // temporary of a widen-then-transpose.
  uint64_t weights = 0;
  uint64_t kv_cache = 0;  // F32 keys and values of every layer for kv_positions positions
  uint64_t total() const;
};

// For a validated config whose weight matrices are stored as `weight_dtype`
// (F32, BF16 or F16). Saturates at UINT64_MAX instead of overflowing.
MemoryEstimate estimate_load_memory(const MonetConfig& c, DType weight_dtype, int64_t kv_positions = 0);

// Memory this process can still get: the smaller of MemAvailable
// (/proc/meminfo) and the room left under a cgroup v2 memory limit; 0 when
// neither can be read.
uint64_t available_memory_bytes();

// "12.3 GiB", "512 MiB", "4.0 KiB", "17 bytes"
std::string format_bytes(uint64_t bytes);

// monet::Error "<source>: loading needs X (W for converted weights, K for the
// KV cache of N positions) beyond the mapped weights, but only Y of memory is
// available" when the estimate exceeds available_memory_bytes(). `available`
// overrides the measurement (0: measure).
void check_load_memory(const MonetConfig& c, DType weight_dtype, int64_t kv_positions, const std::string& source,
                       uint64_t available = 0);

}  // namespace monet
