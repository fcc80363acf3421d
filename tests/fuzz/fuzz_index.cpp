// Expert index databases: the input is an SQLite file (the seed is a real
// index; mutations damage its pages, rows and settings). IndexReader must
// refuse it with a monet::Error or answer every query with rows inside the
// index's settings.
#include "fuzz_util.h"
#include "monet/error.h"
#include "monet/index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = monet_fuzz::scratch_dir() / "index.db";
  monet_fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
  try {
    const monet::IndexReader index(path.string());
    const monet::IndexSettings& s = index.settings();
    FUZZ_CHECK(s.experts >= 1 && s.groups >= 1 && s.top_k >= 1);
    FUZZ_CHECK(index.tokens() >= 0);
    const int64_t experts = s.experts * s.experts;
    for (int64_t g = 0; g < std::min<int64_t>(s.groups, 4); g++)
      for (monet::ExpertOrder order : {monet::ExpertOrder::Count, monet::ExpertOrder::MaxProb, monet::ExpertOrder::Id}) {
        int64_t total = 0;
        for (const monet::ExpertSummary& e : index.experts(g, order, 16, 0, &total)) {
          FUZZ_CHECK(e.expert >= 0 && e.expert < experts);
          const monet::ExpertDetail d = index.expert(g, e.expert);
          for (const monet::ExpertContext& c : d.contexts) FUZZ_CHECK(c.focus >= 0 && c.focus < int64_t(c.context.size()));
        }
        FUZZ_CHECK(total >= 0);
      }
    for (const monet::TokenMatch& m : index.search("the", 16))
      FUZZ_CHECK(m.group >= 0 && m.group < s.groups && m.expert >= 0 && m.expert < experts);
  } catch (const monet::Error&) {
  }
  monet_fuzz::remove_file(path);
  return 0;
}
