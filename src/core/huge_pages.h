// 2 MiB pages (transparent huge pages) for weights that are streamed: each
// 4 KiB page of a streamed matrix costs a TLB miss and a page walk; a 2 MiB
// page costs one per 512 of them. Two sources: anonymous memory (copies of
// converted weights) and the page cache of the weight files themselves
// (Linux keeps 2 MiB folios of files on file systems with large folios, e.g.
// ext4 and XFS on recent kernels, and maps them whole where the mapping's
// address is 2 MiB aligned).
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

// A read-only private mapping of the first `bytes` of the open file `fd` at
// a 2 MiB-aligned address, with MADV_HUGEPAGE: 2 MiB folios of the file in
// the page cache are mapped whole, and pages read in by faults come as 2 MiB
// folios. null (errno set) on failure; unmap with munmap(map, bytes).
void* map_file_huge(int fd, size_t bytes);

// Bytes of the mapping that starts at `start` mapped by 2 MiB pages
// (FilePmdMapped + ShmemPmdMapped + AnonHugePages in /proc/self/smaps); 0 where unknown.
size_t huge_mapped_bytes(const void* start);

// Faults in every page of [start, start + bytes) (MADV_POPULATE_READ, or a
// read per 4 KiB page where the kernel predates it).
void populate_mapping(const void* start, size_t bytes);

}  // namespace monet
