// Anonymous memory backed by 2 MiB pages (transparent huge pages), for
// weights that are streamed: each 4 KiB page of a streamed matrix costs a
// TLB miss and a page walk; a 2 MiB page costs one per 512 of them.
#pragma once
#include <cstddef>
#include <memory>

namespace monet {

// The kernel backs memory that asks for it with huge pages
// (/sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise").
bool huge_pages_available();

// `bytes` of zeroed memory, 2 MiB aligned, with MADV_HUGEPAGE; null when the
// mapping fails. Freed (munmap) with the last owner.
std::shared_ptr<void> alloc_huge_pages(size_t bytes);

}  // namespace monet
