// monet quantize --model DIR --out DIR2 --type q8_0: a copy of a checkpoint
// with block int8 weights (docs/quantization.md) that every command loads.
#include <cstdio>

#include "cli_util.h"
#include "commands.h"
#include "monet/quantize.h"

void add_quantize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Write a copy of a checkpoint with int8 weights (q8_0: blocks of 32, F16 scales)");
  static std::string model_dir, out_dir, type = "q8_0";
  add_model_option(cmd, model_dir);
  cmd->add_option("--out", out_dir, "output checkpoint directory (must not exist)")->required();
  cmd->add_option("--type", type, "quantization type")->check(CLI::IsMember({"q8_0"}))->capture_default_str();
  cmd->callback([] {
    const monet::QuantizeSummary s = monet::quantize_checkpoint(model_dir, out_dir, type);
    std::printf("wrote %s: %lld tensors quantized (%s), %lld kept; tensor data %.1f MiB -> %.1f MiB\n", out_dir.c_str(),
                (long long)s.quantized, type.c_str(), (long long)s.kept, double(s.bytes_in) / (1 << 20),
                double(s.bytes_out) / (1 << 20));
  });
}
