// monet plot-loss LOG [LOG...] --out loss.png [--title T] [--width W --height H] [--log-y] [--smooth A]
// Training curves (train and validation loss against step) from train.csv files.
#include <cstdio>

#include "commands.h"
#include "monet/plot.h"

void add_plot_loss_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("plot-loss", "Draw train/validation loss curves from train.csv files as a PNG");
  static std::vector<std::string> logs;
  static monet::PlotOptions opt;
  cmd->add_option("LOG", logs, "train.csv files written by `monet train` (legend: their parent directories)")
      ->required();
  cmd->add_option("--out,-o", opt.out_path, "output PNG")->required();
  cmd->add_option("--title", opt.title, "plot title (default \"Training loss\")");
  cmd->add_option("--width", opt.width, "image width in pixels (default 1000)");
  cmd->add_option("--height", opt.height, "image height in pixels (default 600)");
  cmd->add_flag("--log-y", opt.log_y, "logarithmic loss axis");
  cmd->add_option("--smooth", opt.smooth, "EMA coefficient for the train curve, in [0, 1) (default 0: raw)");
  cmd->callback([] {
    monet::plot_loss(logs, opt);
    std::printf("wrote %s\n", opt.out_path.c_str());
  });
}
