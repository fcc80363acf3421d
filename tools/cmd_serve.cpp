// monet serve [--model DIR] [--index INDEX.db] [--host 127.0.0.1] [--port 8080]
//             [--parallel N] [--ctx N] [--api-key KEY] [--threads N]
// One server: the expert viewer (/, /api/*) and the OpenAI-compatible API
// (/v1/completions, /v1/chat/completions, ...). With --index and no --model,
// the model the index was built with. SIGINT/SIGTERM: the requests in flight
// finish, then the server exits.
#include <pthread.h>
#include <signal.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/server.h"

void add_serve_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible inference server (continuous batching) and the expert viewer (JSON API under /api)");
  static std::string model_dir, index_path;
  static monet::ServeOptions o;
  static DeviceArgs device;
  CLI::Option* model_opt = add_model_option(cmd, model_dir, "checkpoint directory (with --index: the index's model)");
  cmd->add_option("--index", index_path, "index built by monet index (serves the expert viewer's data)");
  cmd->add_option("--port", o.port, "port (default 8080; 0: any free port)");
  cmd->add_option("--host", o.host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--parallel", o.parallel, "requests decoded together in one batched step (default 4)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--ctx", o.context, "positions per request, prompt + generated (default: the model's maximum)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-queue", o.max_queue, "requests waiting for a slot before 429 (default 512)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--api-key", o.api_key, "require \"Authorization: Bearer KEY\" on /v1/* (default: none)");
  cmd->add_option("--model-name", o.model_name, "model id of the API (default: the checkpoint directory's name)");
  cmd->add_option("--template", o.chat_template, "chat format: llama2, mistral or chatml (default: tokenizer_config.json)");
  add_device_options(cmd, device);
  // A served answer must not depend on the requests that share its batched
  // steps: exact float32 by default (bf16 products differ from f32 by 2^-8 per
  // input, and a rounding that flips between batch shapes can flip a near-tied
  // greedy token).
  device.compute = "f32";
  cmd->get_option("--compute")
      ->description("arithmetic of the matrix products: f32 (exact; the server's default, so that an answer does not "
                    "depend on the requests batched with it), auto or bf16 (bf16 products for bf16 weights: faster "
                    "prefill and batched steps; near-tied greedy tokens may then differ with the batch)");
  cmd->callback([model_opt] {
    // SIGINT/SIGTERM go to one thread that asks the server to finish (every
    // thread started from here on inherits the blocked mask).
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    std::signal(SIGPIPE, SIG_IGN);  // a client that went away is a failed write, not the end of the server

    o.on_ready = [](const std::string& host, int port) {
      std::printf("monet viewer on http://%s:%d/, OpenAI API on http://%s:%d/v1 (loading the model: /health "
                  "answers 503 until it is ready)\n", host.c_str(), port, host.c_str(), port);
      std::fflush(stdout);
    };
    o.on_loaded = [] {
      std::printf("model loaded: OpenAI API under /v1, viewer at /\n");
      std::fflush(stdout);
    };
    monet::Server server(o);
    std::thread([&server, signals] {
      int sig = 0;
      sigwait(&signals, &sig);
      std::fprintf(stderr, "monet serve: %s: finishing the requests in flight\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
      server.shutdown();
    }).detach();

    server.run([model_opt] {
      monet::ServedModel served;
      if (!index_path.empty()) {
        served.index = std::make_unique<monet::IndexReader>(index_path);
        // Without --model, the index's own model: its expert ids mean that model's experts.
        if (model_opt->count() == 0) model_dir = served.index->settings().model;
      }
      served.model = monet::Model::load(model_dir, device.load_options());
      served.tok = monet::Tokenizer::load_dir(model_dir);
      // VisionMonet (llava_monet): its tower embeds the images of chat messages.
      if (monet::is_llava_config((std::filesystem::path(model_dir) / "config.json").string())) {
        served.vision = monet::VisionTower::load(model_dir, served.model->config().hidden_size, served.model->backend());
        std::fprintf(stderr, "vision: %s\n", served.vision->describe().c_str());
      }
      if (served.index) {
        const monet::MonetConfig& c = served.model->config();
        const monet::IndexSettings& built = served.index->settings();
        if (built.experts != c.moe_experts || built.groups != c.num_router_layers())
          monet::fail(index_path, ": built with ", built.model, " (", built.experts, " experts per side, ",
                      built.groups, " router groups), but ", model_dir, " has ", c.moe_experts, " and ",
                      c.num_router_layers(), ": serve it with --model of the index's model");
        if (std::filesystem::weakly_canonical(model_dir) != std::filesystem::weakly_canonical(built.model))
          std::fprintf(stderr, "note: %s was built with %s; serving %s (same shape)\n", index_path.c_str(),
                       built.model.c_str(), model_dir.c_str());
      }
      return served;
    });
    std::printf("monet serve: stopped\n");
  });
}
