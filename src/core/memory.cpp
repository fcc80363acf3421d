#include "monet/memory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "core/checked.h"
#include "monet/error.h"

namespace monet {

uint64_t MemoryEstimate::total() const { return sat_add(weights, kv_cache); }

MemoryEstimate estimate_load_memory(const MonetConfig& c, DType weight_dtype, int64_t kv_positions) {
  const int64_t d = c.hidden_size, H = c.moe_heads, E = c.moe_experts, m = c.moe_dim;
  const int64_t L = c.num_hidden_layers, hd = c.head_dim(), nkv = c.num_key_value_heads;
  const int64_t routers = c.num_router_layers();
  // Vectors, always converted to F32: final norm, two norms per layer, the
  // expert biases (E*m per layer in both layouts), 4 BatchNorm buffers of H.
  uint64_t vectors = sat_add(uint64_t(d), sat_product({L, 2 * d + E * m}));
  vectors = sat_add(vectors, sat_product({routers, 4, H}));
  // The expert v matrices, transposed into a copy: d*E*m elements per layer
  // (VD: four [d/2, E*m/2]; HD: one [d, E*m]).
  const uint64_t v_per_layer = sat_product({d, E, m});
  const uint64_t v_all = sat_mul(v_per_layer, uint64_t(L));
  MemoryEstimate est;
  // Matrices are read in place from the mapping in their own dtype; only the
  // v copies and the vectors take memory of their own.
  const uint64_t v_bytes = sat_mul(v_all, std::max<uint64_t>(1, dtype_size(weight_dtype)));
  est.weights = sat_add(v_bytes, sat_mul(vectors, 4));
  est.kv_cache = sat_mul(sat_product({L, std::max<int64_t>(0, kv_positions), nkv, hd, 2}), 4);
  return est;
}

namespace {

// A "Key:   N kB" line of /proc/meminfo, in bytes; 0 when absent.
uint64_t meminfo_bytes(const std::string& key) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.compare(0, key.size() + 1, key + ":") != 0) continue;
    std::istringstream in(line.substr(key.size() + 1));
    uint64_t kb = 0;
    if (in >> kb) return sat_mul(kb, 1024);
  }
  return 0;
}

// One number from a cgroup v2 file ("max" or unreadable: 0).
uint64_t cgroup_number(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return 0;
  try {
    return std::stoull(word);
  } catch (const std::exception&) {
    return 0;
  }
}

// Room left under the process's cgroup memory limit: cgroup v2
// ("0::/path" in /proc/self/cgroup, memory.max) or v1 ("N:memory:/path",
// memory.limit_in_bytes; in a container often mounted at its own root).
// 0 when there is no limit or it cannot be read.
uint64_t cgroup_room() {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  std::vector<std::pair<std::string, std::string>> candidates;  // limit file, usage file
  while (std::getline(f, line)) {
    if (line.compare(0, 3, "0::") == 0) {
      const std::string dir = "/sys/fs/cgroup" + line.substr(3);
      candidates.emplace_back(dir + "/memory.max", dir + "/memory.current");
    } else if (const size_t at = line.find(":memory:"); at != std::string::npos) {
      for (const std::string& dir : {"/sys/fs/cgroup/memory" + line.substr(at + 8), std::string("/sys/fs/cgroup/memory")})
        candidates.emplace_back(dir + "/memory.limit_in_bytes", dir + "/memory.usage_in_bytes");
    }
  }
  for (const auto& [limit_file, usage_file] : candidates) {
    const uint64_t limit = cgroup_number(limit_file);
    if (limit == 0) continue;
    if (limit >= (uint64_t(1) << 62)) return 0;  // v1's "no limit"
    const uint64_t used = cgroup_number(usage_file);
    return limit > used ? limit - used : 1;
  }
  return 0;
}

}  // namespace

uint64_t available_memory_bytes() {
  uint64_t avail = meminfo_bytes("MemAvailable");
  if (avail == 0) {
    const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) avail = sat_mul(uint64_t(pages), uint64_t(page));
  }
  if (const uint64_t room = cgroup_room(); room > 0) avail = avail == 0 ? room : std::min(avail, room);
  return avail;
}

std::string format_bytes(uint64_t bytes) {
  char buf[64];
  const double b = double(bytes);
  if (bytes >= (uint64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.1f GiB", b / double(uint64_t(1) << 30));
  else if (bytes >= (uint64_t(1) << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", b / double(uint64_t(1) << 20));
  else if (bytes >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  else std::snprintf(buf, sizeof buf, "%llu bytes", (unsigned long long)bytes);
  return buf;
}

void check_load_memory(const MonetConfig& c, DType weight_dtype, int64_t kv_positions, const std::string& source,
                       uint64_t available) {
  const MemoryEstimate est = estimate_load_memory(c, weight_dtype, kv_positions);
  if (available == 0) available = available_memory_bytes();
  if (available == 0 || est.total() <= available) return;  // unknown: let the allocations decide
  fail(source, ": loading needs ", format_bytes(est.total()), " of memory beyond the mapped weights (",
       format_bytes(est.weights), " for converted ", dtype_name(weight_dtype), " weights, ", format_bytes(est.kv_cache),
       " for the KV cache of ", kv_positions, " positions), but only ", format_bytes(available), " is available");
}

}  // namespace monet
