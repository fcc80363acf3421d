// Training curves: reads the train.csv files that `monet train` writes
// (docs/training.md) and draws loss against step as a PNG (Cairo).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace monet {

// One train.csv: the train loss (loss_lm) of every row and the validation
// loss of the rows that have one (val_loss empty elsewhere). Values are
// as written; a "nan" or "inf" loss is kept (and skipped when drawn).
struct LossLog {
  std::string path;
  std::vector<double> step, loss_lm;        // every row, in file order
  std::vector<double> val_step, val_loss;   // rows with a val_loss
};

// Reads a train.csv. The header must name at least the columns step, loss_lm
// and val_loss (any order, other columns ignored); every row must have as
// many fields as the header, step and loss_lm numbers, val_loss a number or
// empty. Throws monet::Error "<path>:<line>: ..." otherwise, and for a
// missing file or a file without rows.
LossLog read_loss_log(const std::string& path);

struct PlotOptions {
  std::string out_path;         // PNG, written atomically (temp file + rename)
  std::string title;            // empty: "Training loss"
  int width = 1000, height = 600;
  bool log_y = false;           // logarithmic loss axis (values <= 0 are skipped)
  double smooth = 0.0;          // EMA coefficient for the train curve, in [0, 1); 0 = raw
};

// Colour (r, g, b in 0..255) of log `index`'s train and validation curves.
std::array<uint8_t, 3> plot_train_color(size_t index);
std::array<uint8_t, 3> plot_val_color(size_t index);

// The legend name of each log: its file's parent directory ("run1" for
// run1/train.csv), made unique by longer paths where two coincide.
std::vector<std::string> plot_labels(const std::vector<std::string>& csv_paths);

// Reads every csv and draws train loss (loss_lm, thin line, EMA-smoothed when
// options.smooth > 0) and validation loss (points connected) against step,
// with axes, tick labels, axis titles, a legend and a title; writes the PNG.
// Throws monet::Error for bad input (nothing is written then).
void plot_loss(const std::vector<std::string>& csv_paths, const PlotOptions& options);

}  // namespace monet
