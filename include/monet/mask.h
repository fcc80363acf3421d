// Expert masks: remove composed experts (i, j) or whole components of a
// router group, as in shared/monet-spec.md "Masking". A removed pair's weight
// is zero in every layer of its group; nothing is renormalised.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "monet/config.h"

namespace monet {

struct ExpertMask {
  int64_t experts = 0;  // E of the model the mask was built for
  // Per router group g (layers g*G .. g*G+G-1):
  std::vector<std::vector<uint8_t>> side1, side2;  // [E]: component removed
  std::vector<std::vector<int64_t>> pairs;         // sorted ids i*E + j

  static ExpertMask none(const MonetConfig& c);
  // The JSON mask file: {"experts": [{"group": g, "expert": id}],
  //                      "components": [{"group": g, "side": 1|2, "index": i}]}
  static ExpertMask load_json(const std::string& path, const MonetConfig& c);
  static ExpertMask parse_json(const std::string& text, const std::string& source, const MonetConfig& c);
  std::string to_json() const;

  bool group_empty(int64_t g) const;
  bool removed(int64_t g, int64_t i, int64_t j) const;
  int64_t removed_count() const;  // pairs + components listed
};

}  // namespace monet
