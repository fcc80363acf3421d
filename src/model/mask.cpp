#include "monet/mask.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {

ExpertMask ExpertMask::none(const MonetConfig& c) {
  ExpertMask m;
  m.experts = c.moe_experts;
  const size_t groups = size_t(c.num_router_layers());
  m.side1.assign(groups, std::vector<uint8_t>(size_t(c.moe_experts), 0));
  m.side2 = m.side1;
  m.pairs.assign(groups, {});
  return m;
}

ExpertMask ExpertMask::load_json(const std::string& path, const MonetConfig& c) {
  return parse_json(read_file(path), path, c);
}

ExpertMask ExpertMask::parse_json(const std::string& text, const std::string& source, const MonetConfig& c) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(source, ": not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail(source, ": a mask file is a JSON object with \"experts\" and/or \"components\"");
  ExpertMask m = none(c);
  const int64_t groups = c.num_router_layers(), E = c.moe_experts;
  auto integer = [&](const nlohmann::json& item, const char* key, const std::string& where, int64_t lo, int64_t hi) {
    if (!item.contains(key) || !item[key].is_number_integer())
      fail(source, ": ", where, " needs an integer \"", key, "\"");
    const int64_t v = item[key].get<int64_t>();
    if (v < lo || v >= hi) fail(source, ": ", where, " \"", key, "\" = ", v, " is outside [", lo, ", ", hi, ")");
    return v;
  };
  for (const auto& [key, value] : j.items())
    if (key != "experts" && key != "components")
      fail(source, ": unknown key \"", key, "\" (expected \"experts\" and/or \"components\")");
  if (j.contains("experts")) {
    if (!j["experts"].is_array()) fail(source, ": \"experts\" must be an array");
    for (size_t n = 0; n < j["experts"].size(); n++) {
      const auto& item = j["experts"][n];
      const std::string where = "experts[" + std::to_string(n) + "]";
      if (!item.is_object()) fail(source, ": ", where, " must be an object {\"group\": g, \"expert\": id}");
      const int64_t g = integer(item, "group", where, 0, groups);
      const int64_t id = integer(item, "expert", where, 0, E * E);
      m.pairs[size_t(g)].push_back(id);
    }
  }
  if (j.contains("components")) {
    if (!j["components"].is_array()) fail(source, ": \"components\" must be an array");
    for (size_t n = 0; n < j["components"].size(); n++) {
      const auto& item = j["components"][n];
      const std::string where = "components[" + std::to_string(n) + "]";
      if (!item.is_object()) fail(source, ": ", where, " must be an object {\"group\": g, \"side\": 1|2, \"index\": i}");
      const int64_t g = integer(item, "group", where, 0, groups);
      const int64_t side = integer(item, "side", where, 1, 3);
      const int64_t i = integer(item, "index", where, 0, E);
      (side == 1 ? m.side1 : m.side2)[size_t(g)][size_t(i)] = 1;
    }
  }
  for (auto& p : m.pairs) {
    std::sort(p.begin(), p.end());
    p.erase(std::unique(p.begin(), p.end()), p.end());
  }
  return m;
}

std::string ExpertMask::to_json() const {
  nlohmann::json j;
  j["experts"] = nlohmann::json::array();
  j["components"] = nlohmann::json::array();
  for (size_t g = 0; g < pairs.size(); g++) {
    for (int64_t id : pairs[g]) j["experts"].push_back({{"group", g}, {"expert", id}});
    for (size_t i = 0; i < side1[g].size(); i++)
      if (side1[g][i]) j["components"].push_back({{"group", g}, {"side", 1}, {"index", i}});
    for (size_t i = 0; i < side2[g].size(); i++)
      if (side2[g][i]) j["components"].push_back({{"group", g}, {"side", 2}, {"index", i}});
  }
  return j.dump(1);
}

bool ExpertMask::group_empty(int64_t g) const {
  if (size_t(g) >= pairs.size()) return true;
  if (!pairs[size_t(g)].empty()) return false;
  for (uint8_t v : side1[size_t(g)]) if (v) return false;
  for (uint8_t v : side2[size_t(g)]) if (v) return false;
  return true;
}

bool ExpertMask::removed(int64_t g, int64_t i, int64_t j) const {
  if (side1[size_t(g)][size_t(i)] || side2[size_t(g)][size_t(j)]) return true;
  const auto& p = pairs[size_t(g)];
  return std::binary_search(p.begin(), p.end(), i * experts + j);
}

int64_t ExpertMask::removed_count() const {
  int64_t n = 0;
  for (size_t g = 0; g < pairs.size(); g++) {
    n += int64_t(pairs[g].size());
    for (uint8_t v : side1[g]) n += v;
    for (uint8_t v : side2[g]) n += v;
  }
  return n;
}

}  // namespace monet
