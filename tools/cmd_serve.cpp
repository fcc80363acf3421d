// monet serve [--model DIR] [--index INDEX.db] [--port 8080] [--host 127.0.0.1]
// With --index and no --model, the model the index was built with.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/server.h"

void add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Browse experts in a web viewer (JSON API under /api)");
  static std::string model_dir, index_path;
  static monet::ServeOptions o;
  static int threads = 0;
  CLI::Option* model_opt = add_model_option(cmd, model_dir, "checkpoint directory (with --index: the index's model)");
  cmd->add_option("--index", index_path, "index built by monet index");
  cmd->add_option("--port", o.port, "port (default 8080)");
  cmd->add_option("--host", o.host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--threads", threads, "CPU threads");
  cmd->callback([model_opt] {
    std::unique_ptr<monet::IndexReader> index;
    nlohmann::json built;  // the index's settings: the model it was built with, experts, groups
    if (!index_path.empty()) {
      index = std::make_unique<monet::IndexReader>(index_path);
      built = nlohmann::json::parse(index->meta("settings"), nullptr, false);
      if (!built.is_object() || !built.contains("model") || !built["model"].is_string())
        monet::fail(index_path, ": its settings name no model");
      // Without --model, the index's own model: its expert ids mean that model's experts.
      if (model_opt->count() == 0) model_dir = built["model"].get<std::string>();
    }
    auto model = monet::Model::load(model_dir, {threads});
    auto tok = monet::Tokenizer::load_dir(model_dir);
    if (index) {
      const monet::MonetConfig& c = model->config();
      if (built.value("experts", int64_t(-1)) != c.moe_experts || built.value("groups", int64_t(-1)) != c.num_router_layers())
        monet::fail(index_path, ": built with ", built["model"].get<std::string>(), " (", built.value("experts", int64_t(-1)),
                    " experts per side, ", built.value("groups", int64_t(-1)), " router groups), but ", model_dir, " has ",
                    c.moe_experts, " and ", c.num_router_layers(), ": serve it with --model of the index's model");
      if (std::filesystem::weakly_canonical(model_dir) != std::filesystem::weakly_canonical(built["model"].get<std::string>()))
        std::fprintf(stderr, "note: %s was built with %s; serving %s (same shape)\n", index_path.c_str(),
                     built["model"].get<std::string>().c_str(), model_dir.c_str());
    }
    o.on_ready = [](const std::string& host, int port) {
      std::printf("monet viewer on http://%s:%d/\n", host.c_str(), port);
      std::fflush(stdout);
    };
    monet::serve(*model, *tok, index.get(), o);
  });
}
