#include "monet/tensor.h"

#include <cstring>
#include <vector>

namespace monet {

void Weight::rows_to_f32(int64_t row0, int64_t n, float* out) const {
  dtype_traits(dtype).to_f32(row(row0), out, n * cols);
}

Weight Weight::from_f32(const float* values, int64_t rows, int64_t cols, DType dtype) {
  Weight w;
  w.dtype = dtype;
  w.rows = rows;
  w.cols = cols;
  auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[w.bytes()]);
  dtype_traits(dtype).from_f32(values, buf.get(), rows * cols);
  w.data = buf.get();
  w.owned = std::shared_ptr<const void>(buf, buf.get());
  return w;
}

}  // namespace monet
