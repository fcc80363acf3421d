// monet index --model DIR --corpus FILES... --out INDEX.db [--top-k 32] [--max-tokens N] [--resume]
#include <unistd.h>

#include <cstdio>

#include "cli_util.h"
#include "commands.h"
#include "distributed.h"
#include "monet/index.h"
#include "monet/model.h"
#include "monet/tokenizer.h"

void add_index_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("index", "Index a corpus: each expert's top activating contexts and density");
  static std::string model_dir, out_path;
  static std::vector<std::string> corpus;
  static monet::IndexOptions o;
  static DeviceArgs device;
  add_model_option(cmd, model_dir);
  cmd->add_option("--corpus", corpus, "text files (each one document)")->required();
  cmd->add_option("--out", out_path, "SQLite index file")->required();
  cmd->add_option("--top-k", o.top_k, "contexts kept per expert (default 32)");
  cmd->add_option("--window", o.window, "tokens of context on each side (default 8)");
  cmd->add_option("--context", o.context, "tokens per forward window (default 256)");
  cmd->add_option("--threshold", o.threshold, "count an expert as firing above this probability (default 0.01)");
  cmd->add_option("--max-tokens", o.max_tokens, "stop after about this many tokens (whole windows); --resume continues");
  cmd->add_option("--commit-every", o.checkpoint_tokens, "write the changes to the database every N tokens (default 200000)");
  add_device_options(cmd, device);
  cmd->add_flag("--resume", o.resume, "continue an existing index: skip its documents, continue where it stopped");
  cmd->callback([] {
    auto model = monet::Model::load(model_dir, device.load_options());
    auto tok = monet::Tokenizer::load_dir(model_dir);
    const bool tty = isatty(STDERR_FILENO);
    double last = -1;
    int64_t last_tokens = -1;
    // Under mpirun/srun: the windows are shared among the processes, rank 0
    // writes the index and reports (docs/distributed.md).
    o.comm = &world();
    const bool root = world().rank() == 0;
    const monet::IndexProgress done = monet::build_index(*model, *tok, corpus, out_path, o, [&](const monet::IndexProgress& p) {
      if (p.tokens_done == last_tokens || (p.seconds - last < (tty ? 0.2 : 5.0) && p.bytes_done < p.bytes_total)) return;
      last = p.seconds;
      last_tokens = p.tokens_done;
      const double frac = p.bytes_total ? double(p.bytes_done) / double(p.bytes_total) : 1.0;
      const int width = 30, filled = int(frac * width);
      std::fprintf(stderr, "%s[%.*s%*s] %3.0f%% of %.1f MB, %lld tokens, %.0f tokens/s%s", tty ? "\r" : "", filled,
                   "##############################", width - filled, "", 100 * frac, p.bytes_total / 1e6,
                   (long long)p.tokens_done, p.tokens_done / std::max(p.seconds, 1e-9), tty ? "" : "\n");
    });
    if (!root) return;
    if (tty) std::fprintf(stderr, "\n");
    // The time includes tokenising and every database write.
    std::printf("indexed %lld tokens in %.1f s (%.0f tokens/s) into %s\n", (long long)done.tokens_done, done.seconds,
                done.tokens_done / std::max(done.seconds, 1e-9), out_path.c_str());
  });
}
