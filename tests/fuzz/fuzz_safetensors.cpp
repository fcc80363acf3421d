// The safetensors header and data layout: parse_safetensors on the raw bytes
// (what SafetensorsFile validates after mapping a file), then every tensor
// read within its bytes.
#include <cmath>

#include "fuzz_util.h"
#include "monet/error.h"
#include "monet/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  monet::SafetensorsImage image;
  try {
    image = monet::parse_safetensors(data, size, "fuzz.safetensors");
  } catch (const monet::Error&) {
    return 0;
  }
  for (const monet::TensorInfo& t : image.tensors) {
    // inside the image, and as many bytes as the shape and dtype say
    FUZZ_CHECK(t.data >= data && t.data + t.nbytes <= data + size);
    FUZZ_CHECK(uint64_t(t.numel()) * monet::dtype_size(t.dtype) == t.nbytes);
    (void)t.shape_str();
    uint8_t x = 0;
    for (size_t i = 0; i < t.nbytes; i++) x ^= t.data[i];  // every byte readable (ASan)
    const bool is_float = t.dtype == monet::DType::F64 || t.dtype == monet::DType::F32 || t.dtype == monet::DType::F16 ||
                          t.dtype == monet::DType::BF16;
    const size_t n = std::min<size_t>(size_t(t.numel()), 4096);
    double sum = x;
    try {
      for (size_t i = 0; i < n; i++) sum += t.element(i);
      FUZZ_CHECK(is_float || n == 0);
    } catch (const monet::Error&) {
      FUZZ_CHECK(!is_float);
    }
    (void)sum;
  }
  return 0;
}
