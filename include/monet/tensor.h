// Weights and device memory: the two kinds of data the backends work on.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "monet/dtype.h"

namespace monet {

// A row-major weight matrix [rows, cols] of any weight dtype (F32, F16,
// BF16, Q8_0; see dtype_traits). A row is a whole number of blocks. `data`
// points into the checkpoint mapping or into `owned` (converted or re-laid
// out at load time).
struct Weight {
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  std::shared_ptr<const void> owned;

  size_t row_bytes() const { return dtype_row_bytes(dtype, cols); }
  size_t bytes() const { return size_t(rows) * row_bytes(); }
  const uint8_t* row(int64_t r) const { return static_cast<const uint8_t*>(data) + size_t(r) * row_bytes(); }
  // Rows [row0, row0 + n) as float32 into out [n, cols].
  void rows_to_f32(int64_t row0, int64_t n, float* out) const;

  // A weight holding `values` [rows, cols] converted to `dtype` (owned).
  static Weight from_f32(const float* values, int64_t rows, int64_t cols, DType dtype);
  // A weight read in place from `data` (not owned: a mapped file, say).
  static Weight view(DType dtype, int64_t rows, int64_t cols, const void* data) {
    Weight w;
    w.dtype = dtype;
    w.rows = rows;
    w.cols = cols;
    w.data = data;
    return w;
  }
};

// Memory a backend allocated: host memory for the CPU backend, device memory
// for a GPU backend (never dereferenced on the host then). Move-only.
class Buffer {
 public:
  using Free = void (*)(void*);
  Buffer() = default;
  Buffer(void* ptr, size_t bytes, Free free_fn) : ptr_(ptr, free_fn), bytes_(bytes) {}
  void* data() const { return ptr_.get(); }
  float* f32() const { return static_cast<float*>(ptr_.get()); }
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return bool(ptr_); }

 private:
  std::unique_ptr<void, Free> ptr_{nullptr, nullptr};
  size_t bytes_ = 0;
};

}  // namespace monet
