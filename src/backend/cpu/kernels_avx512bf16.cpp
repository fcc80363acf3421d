// The row kernels built for the avx512bf16 level (flags set in CMakeLists.txt).
#include "backend/cpu/kernels.h"

namespace monet::cpu::avx512bf16 {
constexpr const char* kKernelSetName = "avx512bf16";
#include "backend/cpu/kernels_impl.inc"
}  // namespace monet::cpu::avx512bf16
