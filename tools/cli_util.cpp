#include "cli_util.h"

#include <cerrno>
#include <climits>
#include <cstdlib>

#include "monet/error.h"

std::vector<int32_t> parse_id_list(const std::string& text) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(start, end - start);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    char* stop = nullptr;
    errno = 0;
    long long v = item.empty() ? 0 : std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0' || errno != 0 || v < 0 || v > INT32_MAX)
      monet::fail("--ids: '", item, "' is not a token id (expected comma-separated non-negative integers)");
    ids.push_back(int32_t(v));
    start = end + 1;
  }
  return ids;
}
