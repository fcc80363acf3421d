// monet serve [--model DIR] [--index INDEX.db] [--port 8080] [--host 127.0.0.1]
// With --index and no --model, the model the index was built with.
#include <cstdio>
#include <filesystem>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/server.h"

void add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Browse experts in a web viewer (JSON API under /api)");
  static std::string model_dir, index_path;
  static monet::ServeOptions o;
  static DeviceArgs device;
  CLI::Option* model_opt = add_model_option(cmd, model_dir, "checkpoint directory (with --index: the index's model)");
  cmd->add_option("--index", index_path, "index built by monet index");
  cmd->add_option("--port", o.port, "port (default 8080)");
  cmd->add_option("--host", o.host, "address to listen on (default 127.0.0.1)");
  add_device_options(cmd, device);
  cmd->callback([model_opt] {
    std::unique_ptr<monet::IndexReader> index;
    if (!index_path.empty()) {
      index = std::make_unique<monet::IndexReader>(index_path);
      // Without --model, the index's own model: its expert ids mean that model's experts.
      if (model_opt->count() == 0) model_dir = index->settings().model;
    }
    auto model = monet::Model::load(model_dir, device.load_options());
    auto tok = monet::Tokenizer::load_dir(model_dir);
    if (index) {
      const monet::MonetConfig& c = model->config();
      const monet::IndexSettings& built = index->settings();
      if (built.experts != c.moe_experts || built.groups != c.num_router_layers())
        monet::fail(index_path, ": built with ", built.model, " (", built.experts, " experts per side, ", built.groups,
                    " router groups), but ", model_dir, " has ", c.moe_experts, " and ", c.num_router_layers(),
                    ": serve it with --model of the index's model");
      if (std::filesystem::weakly_canonical(model_dir) != std::filesystem::weakly_canonical(built.model))
        std::fprintf(stderr, "note: %s was built with %s; serving %s (same shape)\n", index_path.c_str(),
                     built.model.c_str(), model_dir.c_str());
    }
    o.on_ready = [](const std::string& host, int port) {
      std::printf("monet viewer on http://%s:%d/\n", host.c_str(), port);
      std::fflush(stdout);
    };
    monet::serve(*model, *tok, index.get(), o);
  });
}
