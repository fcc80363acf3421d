// monet find-experts --model DIR --domain NAME=FILE ... --out-dir DIR [--eval]
// Domain experts by the paper's statistic; one mask per domain; optionally the
// knowledge-removal table (loss on every domain with each domain's experts removed).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/evaluate.h"
#include "monet/interp.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"

void add_find_experts_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("find-experts", "Find each domain's experts (routing statistics) and write masks");
  static std::string model_dir, out_dir;
  static std::vector<std::string> domain_args;
  static double ratio = 2.0, min_prob = 1e-4;
  static int64_t context = 512;
  static DeviceArgs device;
  static bool evaluate = false;
  add_model_option(cmd, model_dir);
  cmd->add_option("--domain", domain_args, "NAME=FILE, a text file of a domain (two or more)")->required();
  cmd->add_option("--out-dir", out_dir, "directory for NAME.json masks")->required();
  cmd->add_option("--ratio", ratio, "an expert belongs to a domain when its mean probability there is this many "
                                    "times that on every other domain (default 2, as the paper)");
  cmd->add_option("--min-prob", min_prob, "ignore experts with a smaller mean probability on the domain (default 1e-4)");
  cmd->add_option("--context", context, "tokens per window (default 512)");
  add_device_options(cmd, device);
  cmd->add_flag("--eval", evaluate, "also print the loss on every domain with each domain's experts removed");
  cmd->callback([] {
    namespace fs = std::filesystem;
    if (domain_args.size() < 2) monet::fail("find-experts: give at least two --domain NAME=FILE");
    auto model = monet::Model::load(model_dir, device.load_options());
    auto tok = monet::Tokenizer::load_dir(model_dir);
    const monet::MonetConfig& c = model->config();
    context = std::min(context, c.max_position_embeddings);
    std::vector<std::string> names;
    std::vector<std::vector<int32_t>> texts;
    for (const std::string& arg : domain_args) {
      const size_t eq = arg.find('=');
      if (eq == std::string::npos || eq == 0) monet::fail("--domain ", arg, ": expected NAME=FILE");
      names.push_back(arg.substr(0, eq));
      texts.push_back(tok->encode(monet::read_file(arg.substr(eq + 1)), false));
      if (texts.back().empty()) monet::fail(arg.substr(eq + 1), ": no tokens");
    }
    std::vector<monet::RoutingStats> stats;
    for (size_t d = 0; d < names.size(); d++) {
      std::fprintf(stderr, "routing %s (%zu tokens)...\n", names[d].c_str(), texts[d].size());
      stats.push_back(monet::routing_stats(*model, texts[d], context, tok->bos_id()));
    }
    const auto masks = monet::domain_experts(c, stats, ratio, min_prob);
    fs::create_directories(out_dir);
    std::printf("%-16s", "experts");
    for (int64_t g = 0; g < c.num_router_layers(); g++) std::printf(" %9s", ("group " + std::to_string(g)).c_str());
    std::printf(" %9s\n", "total");
    for (size_t d = 0; d < names.size(); d++) {
      monet::write_file_atomic((fs::path(out_dir) / (names[d] + ".json")).string(), masks[d].to_json() + "\n");
      std::printf("%-16s", names[d].c_str());
      for (const auto& p : masks[d].pairs) std::printf(" %9zu", p.size());
      std::printf(" %9lld\n", (long long)masks[d].entry_count());
    }
    std::printf("masks written to %s/NAME.json\n", out_dir.c_str());
    if (!evaluate) return;
    // Knowledge removal: loss on every domain, without and with each mask.
    std::vector<double> base;
    for (size_t d = 0; d < names.size(); d++)
      base.push_back(monet::evaluate_loss(*model, texts[d], context, tok->bos_id()).mean());
    std::printf("\nloss change when a domain's experts are removed (rows) on each domain (columns); base loss in [ ]\n");
    std::printf("%-16s", "removed");
    for (size_t d = 0; d < names.size(); d++) std::printf(" %16s", (names[d] + " [" + std::to_string(base[d]).substr(0, 5) + "]").c_str());
    std::printf("\n");
    for (size_t r = 0; r < names.size(); r++) {
      std::printf("%-16s", names[r].c_str());
      for (size_t d = 0; d < names.size(); d++) {
        const double loss = monet::evaluate_loss(*model, texts[d], context, tok->bos_id(), &masks[r]).mean();
        std::printf(" %+9.4f (%+5.1f%%)", loss - base[d], 100.0 * (std::exp(loss - base[d]) - 1.0));
      }
      std::printf("\n");
    }
    std::printf("(percent: perplexity change)\n");
  });
}
