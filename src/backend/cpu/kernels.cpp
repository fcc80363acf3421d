#include "backend/cpu/kernels.h"

#include <cpuid.h>

#include "monet/error.h"

namespace monet::cpu {

namespace avx512bf16 { extern const KernelSet kKernels; }
namespace avx512 { extern const KernelSet kKernels; }
namespace avx2 { extern const KernelSet kKernels; }
namespace generic { extern const KernelSet kKernels; }

// F16C from CPUID leaf 1 (clang before 15 has no __builtin_cpu_supports("f16c"); the fuzz build uses clang 14).
static bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

std::vector<KernelChoice> kernel_sets() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  // (Every CPU with AVX-512-BF16 has AVX-512-VNNI, the int8 dot products of the Q8_0 kernels.)
  return {{&avx512bf16::kKernels,
           avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")},
          {&avx512::kKernels, avx512},
          {&avx2::kKernels, avx2},
          {&generic::kKernels, true}};
}

void RowPrefetch::issue(int64_t lines) {
  for (const int64_t end = std::min(next + lines, n_rows * row_lines); next < end; next++)
    __builtin_prefetch(static_cast<const char*>(rows[next / row_lines]) + (next % row_lines) * 64, 0, 2);
}

const KernelSet& select_kernels(const std::string& name) {
  const std::vector<KernelChoice> sets = kernel_sets();
  std::string known;
  for (const KernelChoice& k : sets) {
    if ((name.empty() || name == "auto") && k.supported) return *k.set;
    if (name == k.set->name) {
      if (!k.supported) fail("CPU kernels \"", name, "\": this CPU lacks the instructions they need");
      return *k.set;
    }
    known += std::string(known.empty() ? "" : ", ") + k.set->name;
  }
  fail("CPU kernels \"", name, "\" are unknown (expected auto, ", known, ")");
}

}  // namespace monet::cpu
