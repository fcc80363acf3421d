// Mask files: parsing, validation, round trip.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "monet/error.h"
#include "monet/mask.h"

namespace {

monet::MonetConfig two_groups() {
  monet::MonetConfig c;
  c.num_hidden_layers = 4;
  c.moe_groups = 2;
  c.moe_experts = 8;
  return c;
}

void expect_mask_error(const std::string& text, const char* phrase) {
  try {
    monet::ExpertMask::parse_json(text, "m.json", two_groups());
    FAIL() << "accepted: " << text;
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("m.json"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr(phrase)) << text;
  }
}

TEST(Mask, ParsesPairsAndComponents) {
  const auto m = monet::ExpertMask::parse_json(
      R"({"experts": [{"group": 1, "expert": 19}, {"group": 1, "expert": 19}],
          "components": [{"group": 0, "side": 1, "index": 2}, {"group": 0, "side": 2, "index": 7}]})",
      "m.json", two_groups());
  EXPECT_TRUE(m.removed(1, 2, 3));   // 19 = 2*8 + 3
  EXPECT_FALSE(m.removed(1, 3, 2));
  EXPECT_TRUE(m.removed(0, 2, 5));   // row 2 of group 0
  EXPECT_TRUE(m.removed(0, 4, 7));   // column 7 of group 0
  EXPECT_FALSE(m.removed(0, 4, 6));
  EXPECT_FALSE(m.group_empty(0));
  EXPECT_EQ(m.entry_count(), 3);  // the duplicate pair counts once
  const auto back = monet::ExpertMask::parse_json(m.to_json(), "round-trip", two_groups());
  EXPECT_EQ(back.pairs, m.pairs);
  EXPECT_EQ(back.side1, m.side1);
  EXPECT_EQ(back.side2, m.side2);
  EXPECT_TRUE(monet::ExpertMask::parse_json("{}", "m.json", two_groups()).group_empty(1));
}

TEST(Mask, ScalesMultiplyAndRoundTrip) {
  const auto m = monet::ExpertMask::parse_json(
      R"({"experts": [{"group": 0, "expert": 19, "scale": 2.5}],
          "components": [{"group": 0, "side": 1, "index": 2, "scale": 0.5}, {"group": 1, "side": 2, "index": 3}]})",
      "m.json", two_groups());
  EXPECT_FLOAT_EQ(m.weight(0, 2, 3), 2.5f * 0.5f);  // 19 = (2, 3): its pair scale times its row's
  EXPECT_FLOAT_EQ(m.weight(0, 2, 4), 0.5f);
  EXPECT_FLOAT_EQ(m.weight(0, 3, 3), 1.0f);
  EXPECT_FLOAT_EQ(m.weight(1, 5, 3), 0.0f);         // no scale: removal
  EXPECT_TRUE(m.removed(1, 5, 3));
  const auto back = monet::ExpertMask::parse_json(m.to_json(), "round-trip", two_groups());
  EXPECT_EQ(back.pairs, m.pairs);
  EXPECT_EQ(back.side1, m.side1);
  EXPECT_EQ(back.side2, m.side2);
}

TEST(Mask, RejectsBadFiles) {
  expect_mask_error(R"({"experts": [{"group": 0, "expert": 1}, {"group": 0, "expert": 1, "scale": 2}]})",
                    "different scales");
  expect_mask_error(R"({"experts": [{"group": 0, "expert": 1, "scale": "2"}]})", "\"scale\" must be a number");
  expect_mask_error(R"({"experts": [{"group": 0, "expert": 1, "weight": 2}]})", "unknown key \"weight\"");
  expect_mask_error("[1, 2]", "JSON object");
  expect_mask_error("{oops", "not valid JSON");
  expect_mask_error(R"({"expert": []})", "unknown key");
  expect_mask_error(R"({"experts": {}})", "must be an array");
  expect_mask_error(R"({"experts": [{"group": 2, "expert": 1}]})", "outside [0, 2)");
  expect_mask_error(R"({"experts": [{"group": 0, "expert": 64}]})", "outside [0, 64)");
  expect_mask_error(R"({"experts": [{"group": 0}]})", "\"expert\"");
  expect_mask_error(R"({"components": [{"group": 0, "side": 3, "index": 1}]})", "side");
  expect_mask_error(R"({"components": [{"group": 0, "side": 1, "index": 8}]})", "index");
  EXPECT_THROW(monet::ExpertMask::load_json("/nonexistent/mask.json", two_groups()), monet::Error);
}

}  // namespace
