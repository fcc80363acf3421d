#include "core/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace monet {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

bool huge_pages_available() {
  static const bool available = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    std::getline(f, line);  // "always [madvise] never": the bracketed word is the setting
    return line.find("[always]") != std::string::npos || line.find("[madvise]") != std::string::npos;
  }();
  return available;
}

std::shared_ptr<void> alloc_huge_pages(size_t bytes) {
  // A mapping one huge page longer, so that the first whole page can start it.
  const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
  void* map = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) return nullptr;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(map) + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  ::madvise(reinterpret_cast<void*>(start), len - (start - reinterpret_cast<uintptr_t>(map)), MADV_HUGEPAGE);
  return std::shared_ptr<void>(reinterpret_cast<void*>(start), [map, len](void*) { ::munmap(map, len); });
}

}  // namespace monet
