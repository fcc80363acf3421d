#include "core/huge_pages.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

namespace monet {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif
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

void* map_file_huge(int fd, size_t bytes) {
  // Reserve one huge page more than needed, map the file over its first
  // 2 MiB boundary, give back the slack on both sides.
  const size_t page = 4096, len = (bytes + page - 1) / page * page;
  void* reserve = ::mmap(nullptr, len + kHugePage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(reserve);
  const uintptr_t start = (base + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  void* map = ::mmap(reinterpret_cast<void*>(start), bytes, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
  if (map == MAP_FAILED) {
    const int err = errno;
    ::munmap(reserve, len + kHugePage);
    errno = err;
    return nullptr;
  }
  if (start > base) ::munmap(reserve, start - base);
  if (base + len + kHugePage > start + len) ::munmap(reinterpret_cast<void*>(start + len), base + kHugePage - start);
  ::madvise(map, len, MADV_HUGEPAGE);  // EINVAL without THP: the mapping works as any other
  return map;
}

size_t huge_mapped_bytes(const void* start) {
  std::ifstream f("/proc/self/smaps");
  char want[32];
  std::snprintf(want, sizeof want, "%lx-", static_cast<unsigned long>(reinterpret_cast<uintptr_t>(start)));
  bool inside = false;
  size_t kib = 0;
  std::string line;
  while (std::getline(f, line)) {
    // A mapping's header line starts with its address range "start-end "
    // (its first space before any colon); its fields "Name: value" follow.
    const size_t colon = line.find(':'), space = line.find(' ');
    if (space != std::string::npos && (colon == std::string::npos || space < colon)) {
      if (inside) break;
      inside = line.compare(0, std::strlen(want), want) == 0;
      continue;
    }
    unsigned long v = 0;
    if (inside && (std::sscanf(line.c_str(), "FilePmdMapped: %lu kB", &v) == 1 ||
                   std::sscanf(line.c_str(), "ShmemPmdMapped: %lu kB", &v) == 1 ||
                   std::sscanf(line.c_str(), "AnonHugePages: %lu kB", &v) == 1))
      kib += v;
  }
  return kib * 1024;
}

void populate_mapping(const void* start, size_t bytes) {
  if (bytes == 0) return;
  const uintptr_t page = 4096, begin = reinterpret_cast<uintptr_t>(start) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(start) + bytes;
  if (::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ) == 0 || errno != EINVAL) return;
  // Only EINVAL (a kernel before 5.14) falls back to reading page by page:
  // after other errors (a file cut short: EFAULT) nothing is read here.
  volatile uint8_t sink = 0;
  for (uintptr_t p = begin; p < end; p += page) sink = sink + *reinterpret_cast<const volatile uint8_t*>(p);
  (void)sink;
}

}  // namespace monet
