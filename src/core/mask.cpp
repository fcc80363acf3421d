#include "monet/mask.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {

ExpertMask ExpertMask::none(const MonetConfig& c) {
  ExpertMask m;
  m.experts = c.moe_experts;
  const size_t groups = size_t(c.num_router_layers());
  m.side1.assign(groups, std::vector<float>(size_t(c.moe_experts), 1.0f));
  m.side2 = m.side1;
  m.pairs.assign(groups, {});
  m.touched_.assign(groups, 0);
  return m;
}

ExpertMask ExpertMask::load_json(const std::string& path, const MonetConfig& c) {
  return parse_json(read_file(path), path, c);
}

namespace {
// Scales multiply where entries overlap: bounded so that products stay finite.
constexpr float kMaxScale = 1e6f;

void check_scale(float scale, const std::string& where) {
  if (!(std::fabs(scale) <= kMaxScale)) fail(where, ": the scale must be a number in [-1e6, 1e6], got ", scale);
}
}  // namespace

void ExpertMask::add_expert(int64_t group, int64_t id, float scale) {
  const std::string where = "expert " + std::to_string(id) + " of group " + std::to_string(group);
  if (group < 0 || group >= int64_t(pairs.size()))
    fail(where, ": the group is outside [0, ", pairs.size(), ")");
  if (id < 0 || id >= experts * experts) fail(where, ": the expert id is outside [0, ", experts * experts, ")");
  check_scale(scale, where);
  auto& p = pairs[size_t(group)];
  auto it = std::lower_bound(p.begin(), p.end(), std::make_pair(id, -INFINITY));
  if (it != p.end() && it->first == id) {
    if (it->second != scale) fail(where, " is listed twice with different scales (", it->second, ", ", scale, ")");
    return;
  }
  p.insert(it, {id, scale});
  touched_[size_t(group)] = 1;
}

void ExpertMask::add_component(int64_t group, int side, int64_t index, float scale) {
  const std::string where = "component (side " + std::to_string(side) + ", index " + std::to_string(index) +
                            ") of group " + std::to_string(group);
  if (group < 0 || group >= int64_t(pairs.size()))
    fail(where, ": the group is outside [0, ", pairs.size(), ")");
  if (side != 1 && side != 2) fail(where, ": the side must be 1 or 2");
  if (index < 0 || index >= experts) fail(where, ": the index is outside [0, ", experts, ")");
  check_scale(scale, where);
  float& s = (side == 1 ? side1 : side2)[size_t(group)][size_t(index)];
  const bool listed = touched_[size_t(group)] && s != 1.0f;
  if (listed && s != scale) fail(where, " is listed twice with different scales (", s, ", ", scale, ")");
  s = scale;
  touched_[size_t(group)] = 1;
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
  auto integer = [&](const nlohmann::json& item, const char* key, const std::string& where) {
    if (!item.contains(key) || !item[key].is_number_integer())
      fail(source, ": ", where, " needs an integer \"", key, "\"");
    return item[key].get<int64_t>();
  };
  auto scale_of = [&](const nlohmann::json& item, const std::string& where) {
    if (!item.contains("scale")) return 0.0f;
    if (!item["scale"].is_number()) fail(source, ": ", where, " \"scale\" must be a number");
    const double s = item["scale"].get<double>();
    if (!(std::fabs(s) <= double(kMaxScale))) fail(source, ": ", where, " \"scale\" = ", s, " is outside [-1e6, 1e6]");
    return float(s);
  };
  for (const auto& [key, value] : j.items())
    if (key != "experts" && key != "components")
      fail(source, ": unknown key \"", key, "\" (expected \"experts\" and/or \"components\")");
  auto entries = [&](const char* key, const char* shape, auto&& add) {
    if (!j.contains(key)) return;
    if (!j[key].is_array()) fail(source, ": \"", key, "\" must be an array");
    for (size_t n = 0; n < j[key].size(); n++) {
      const auto& item = j[key][n];
      const std::string where = std::string(key) + "[" + std::to_string(n) + "]";
      if (!item.is_object()) fail(source, ": ", where, " must be an object ", shape);
      for (const auto& [k, v] : item.items())
        if (k != "group" && k != "expert" && k != "side" && k != "index" && k != "scale")
          fail(source, ": ", where, " has an unknown key \"", k, "\"");
      try {
        add(item, where);
      } catch (const Error& e) {
        fail(source, ": ", where, ": ", e.what());
      }
    }
  };
  entries("experts", "{\"group\": g, \"expert\": id}", [&](const nlohmann::json& item, const std::string& where) {
    m.add_expert(integer(item, "group", where), integer(item, "expert", where), scale_of(item, where));
  });
  entries("components", "{\"group\": g, \"side\": 1|2, \"index\": i}",
          [&](const nlohmann::json& item, const std::string& where) {
            const int64_t side = integer(item, "side", where);
            if (side != 1 && side != 2) fail("\"side\" = ", side, " must be 1 or 2");
            m.add_component(integer(item, "group", where), int(side), integer(item, "index", where),
                            scale_of(item, where));
          });
  return m;
}

std::string ExpertMask::to_json() const {
  nlohmann::json j;
  j["experts"] = nlohmann::json::array();
  j["components"] = nlohmann::json::array();
  auto entry = [](nlohmann::json e, float scale) {
    if (scale != 0.0f) e["scale"] = scale;  // removal is the default
    return e;
  };
  for (size_t g = 0; g < pairs.size(); g++) {
    for (const auto& [id, scale] : pairs[g]) j["experts"].push_back(entry({{"group", g}, {"expert", id}}, scale));
    for (int side = 1; side <= 2; side++) {
      const std::vector<float>& s = (side == 1 ? side1 : side2)[g];
      for (size_t i = 0; i < s.size(); i++)
        if (s[i] != 1.0f) j["components"].push_back(entry({{"group", g}, {"side", side}, {"index", i}}, s[i]));
    }
  }
  return j.dump(1);
}

bool ExpertMask::group_empty(int64_t g) const {
  return g < 0 || size_t(g) >= touched_.size() || !touched_[size_t(g)];
}

float ExpertMask::weight(int64_t g, int64_t i, int64_t j) const {
  if (group_empty(g)) return 1.0f;
  float w = side1[size_t(g)][size_t(i)] * side2[size_t(g)][size_t(j)];
  const auto& p = pairs[size_t(g)];
  const int64_t id = i * experts + j;
  auto it = std::lower_bound(p.begin(), p.end(), std::make_pair(id, -INFINITY));
  if (it != p.end() && it->first == id) w *= it->second;
  return w;
}

int64_t ExpertMask::entry_count() const {
  int64_t n = 0;
  for (size_t g = 0; g < pairs.size(); g++) {
    n += int64_t(pairs[g].size());
    for (float s : side1[g]) n += s != 1.0f;
    for (float s : side2[g]) n += s != 1.0f;
  }
  return n;
}

}  // namespace monet
