// The row kernels built for the avx2 level (flags set in CMakeLists.txt).
#include "backend/cpu/kernels.h"

namespace monet::cpu::avx2 {
constexpr const char* kKernelSetName = "avx2";
#include "backend/cpu/kernels_impl.inc"
}  // namespace monet::cpu::avx2
