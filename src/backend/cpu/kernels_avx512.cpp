// The row kernels built for the avx512 level (flags set in CMakeLists.txt).
#include "backend/cpu/kernels.h"

namespace monet::cpu::avx512 {
constexpr const char* kKernelSetName = "avx512";
#include "backend/cpu/kernels_impl.inc"
}  // namespace monet::cpu::avx512
