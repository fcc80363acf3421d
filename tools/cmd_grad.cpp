// monet grad --model DIR --tokens FILE --out OUT.safetensors [--dtype f64|f32] [--aux-weight W]
// One training-mode forward + backward: losses, every parameter's gradient
// and the updated BatchNorm running stats (for gradient checks and attribution).

#include <cstdint>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "monet/error.h"
#include "monet/train.h"

void add_grad_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("grad", "Loss gradients of a checkpoint on token rows (training mode), to safetensors");
  static std::string model_dir, tokens_path, out_path, dtype = "f64";
  static double aux_weight = 1e-3;
  static int threads = 0;
  cmd->add_option("--model", model_dir, "checkpoint directory")->required();
  cmd->add_option("--tokens", tokens_path, "text file: one row of T+1 whitespace-separated token ids per sequence")
      ->required();
  cmd->add_option("--out", out_path, "output .safetensors (F64: loss*, grad.<name>, running.<name>)")->required();
  cmd->add_option("--dtype", dtype, "compute type: f64 (default) or f32");
  cmd->add_option("--aux-weight", aux_weight, "weight of L_unif + L_amb (default 1e-3)");
  cmd->add_option("--threads", threads, "CPU threads");
  cmd->callback([] {
    std::ifstream in(tokens_path);
    if (!in) monet::fail(tokens_path, ": cannot open");
    std::vector<std::vector<int32_t>> rows;
    std::string line;
    for (int line_no = 1; std::getline(in, line); line_no++) {
      std::istringstream ls(line);
      std::vector<int32_t> row;
      std::string word;
      while (ls >> word) {
        try {
          size_t used = 0;
          const long long v = std::stoll(word, &used);
          if (used != word.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(word);
          row.push_back(int32_t(v));
        } catch (const std::exception&) {
          monet::fail(tokens_path, ":", line_no, ": '", word, "' is not a token id");
        }
      }
      if (!row.empty()) rows.push_back(std::move(row));
    }
    monet::compute_gradients_to_file(model_dir, rows, out_path, dtype, aux_weight, threads);
  });
}
