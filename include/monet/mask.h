// Expert masks: scale (or remove) composed experts (i, j) or whole components
// of a router group, as in docs/monet.md "Masks and steering". Every expert
// has a weight M[i,j] (1 unless a mask entry covers it) that multiplies its
// term in every layer of its group: M = 0 removes it (knowledge removal),
// M > 1 amplifies it (steering). Nothing is renormalised.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "monet/config.h"

namespace monet {

struct ExpertMask {
  int64_t experts = 0;  // E of the model the mask was built for
  // Per router group g (layers g*G .. g*G+G-1):
  std::vector<std::vector<float>> side1, side2;             // [E] scale of component i / j (1: untouched)
  std::vector<std::vector<std::pair<int64_t, float>>> pairs;  // (id = i*E + j, scale), sorted by id, unique

  static ExpertMask none(const MonetConfig& c);
  // The JSON mask file:
  //   {"experts":    [{"group": g, "expert": id, "scale": s}],
  //    "components": [{"group": g, "side": 1|2, "index": i, "scale": s}]}
  // "scale" is optional (default 0: removal). An entry listed twice with
  // different scales is an error.
  static ExpertMask load_json(const std::string& path, const MonetConfig& c);
  static ExpertMask parse_json(const std::string& text, const std::string& source, const MonetConfig& c);
  std::string to_json() const;

  // Adds entries (the same rules as the JSON file).
  void add_expert(int64_t group, int64_t id, float scale = 0.0f);
  void add_component(int64_t group, int side, int64_t index, float scale = 0.0f);

  bool group_empty(int64_t g) const;  // no entry touches group g
  // M[i,j] of group g: the product of the scales of the entries covering (i, j).
  float weight(int64_t g, int64_t i, int64_t j) const;
  bool removed(int64_t g, int64_t i, int64_t j) const { return weight(g, i, j) == 0.0f; }
  int64_t entry_count() const;  // experts + components listed

 private:
  std::vector<uint8_t> touched_;  // per group: some entry
};

}  // namespace monet
