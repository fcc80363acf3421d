// monet serve --model DIR [--index INDEX.db] [--port 8080] [--host 127.0.0.1]
#include <cstdio>

#include "cli_util.h"
#include "commands.h"
#include "monet/server.h"

void add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Browse experts in a web viewer (JSON API under /api)");
  static std::string model_dir, index_path;
  static monet::ServeOptions o;
  static int threads = 0;
  add_model_option(cmd, model_dir);
  cmd->add_option("--index", index_path, "index built by monet index");
  cmd->add_option("--port", o.port, "port (default 8080)");
  cmd->add_option("--host", o.host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--threads", threads, "CPU threads");
  cmd->callback([] {
    auto model = monet::Model::load(model_dir, {threads});
    auto tok = monet::Tokenizer::load_dir(model_dir);
    std::unique_ptr<monet::IndexReader> index;
    if (!index_path.empty()) index = std::make_unique<monet::IndexReader>(index_path);
    o.on_ready = [](const std::string& host, int port) {
      std::printf("monet viewer on http://%s:%d/\n", host.c_str(), port);
      std::fflush(stdout);
    };
    monet::serve(*model, *tok, index.get(), o);
  });
}
