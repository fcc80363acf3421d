// The row kernels built for the generic level (flags set in CMakeLists.txt).
#include "backend/cpu/kernels.h"

namespace monet::cpu::generic {
constexpr const char* kKernelSetName = "generic";
#include "backend/cpu/kernels_impl.inc"
}  // namespace monet::cpu::generic
