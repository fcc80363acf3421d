#include "cli_util.h"

#include <cerrno>
#include <climits>
#include <cstdlib>

#include <CLI/CLI.hpp>
#include <filesystem>

#include "monet/error.h"
#include "monet/model.h"

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

// The embedded default model (models/README.md says how it was trained).
static const char* kDefaultModel = "models/monet-vd-books";

std::string default_model_dir() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("MONET_MODEL"); env && *env) return env;
  std::error_code ec;
  std::vector<fs::path> roots;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) roots = {exe.parent_path().parent_path(), exe.parent_path()};
  roots.push_back(MONET_SOURCE_DIR);
  for (const fs::path& root : roots)
    if (fs::exists(root / kDefaultModel / "config.json", ec)) return (root / kDefaultModel).string();
  return "";
}

CLI::Option* add_model_option(CLI::App* cmd, std::string& dir, const std::string& what) {
  dir = default_model_dir();
  const std::string shown = dir.empty() ? std::string("none found") : dir;
  CLI::Option* opt = cmd->add_option("--model", dir, what + " (default: $MONET_MODEL or the embedded model, " + shown + ")");
  cmd->parse_complete_callback([&dir] {
    if (dir.empty())
      monet::fail("--model is required: no default model found ($MONET_MODEL is unset and ", kDefaultModel,
                  " is missing next to the binary and in the source tree)");
  });
  return opt;
}

monet::LoadOptions DeviceArgs::load_options() const {
  monet::LoadOptions lo;
  lo.device = device;
  lo.threads = threads;
  lo.compute = compute;
  lo.huge_pages = huge_pages;
  return lo;
}

void add_device_options(CLI::App* cmd, DeviceArgs& args) {
  cmd->add_option("--device", args.device, "where the model runs: cpu (the only backend of this build)");
  cmd->add_option("--threads", args.threads, "CPU threads (default: all cores)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--compute", args.compute,
                  "arithmetic of large matrix products: auto (bf16 products for bf16 weights where the CPU multiplies bf16; "
                  "the default), f32 (exact) or bf16 (inputs rounded to bf16, float32 sums)");
  cmd->add_flag("--huge-pages", args.huge_pages,
                "weights in 2 MiB pages where the kernel offers them (decode about 1.2x faster): weight files "
                "cached in 4 KiB pages are read again into 2 MiB ones (once: the page cache keeps them), weights "
                "the load converts are copied into huge pages; default: the mapped files as cached");
}
