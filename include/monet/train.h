// Training Monet models: `monet train` and `monet grad` (docs/training.md).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "monet/config.h"

namespace monet { class Communicator; }

namespace monet {

// What a training run reports after each optimiser step.
struct TrainStepReport {
  int64_t step = 0, steps = 0;
  double loss = 0, loss_lm = 0, loss_unif = 0, loss_amb = 0, lr = 0;
  double tokens_per_s = 0, eta_seconds = 0;
  double val_loss = 0;  // NaN when this step ran no validation
  std::string saved;    // the checkpoint written after this step, or empty
  int ranks = 1;                 // processes this step ran on
  int64_t comm_bytes = 0;        // bytes this rank sent into collectives this step
  double comm_seconds = 0;       // time this rank spent in them (waiting included)
};

struct TrainOptions {
  // Data and outputs
  std::string data;        // text file or folder of *.txt
  std::string tokenizer;   // directory with tokenizer.json / tokenizer.model
  std::string out;         // output directory (checkpoints, train.csv, data cache)
  std::string init;        // start from this checkpoint's weights and config ("" = random)
  bool resume = false;     // continue from the newest checkpoint in `out`
  // Model shape for random init (ignored with init/resume); vocab from the tokenizer
  MonetConfig shape;
  // Optimisation
  int64_t steps = 1000, batch = 8, seq = 256, grad_accum = 1;
  double lr = 1e-3, warmup = 100, min_lr_ratio = 0.1, weight_decay = 0.1, clip = 1.0;
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  double aux_weight = 1e-3;
  uint64_t seed = 1234;
  double init_std = 0.02;
  // Evaluation, checkpoints, logging
  int64_t eval_every = 100, val_tokens = 32768, save_every = 500, keep = 2, log_every = 10;
  double val_fraction = 0.02;
  std::string save_dtype = "F32";  // F32 or BF16 for model.safetensors
  std::string dtype = "f32";       // compute: f32 or f64 (the reference)
  int threads = 0;
  // Data-parallel training (docs/distributed.md): --batch is the global batch,
  // split over comm's ranks; rank 0 alone writes and reports. null: one process.
  Communicator* comm = nullptr;
  // ZeRO-1: each rank keeps the AdamW moments of 1/ranks of the parameters
  // (gradients reduce-scattered, updated shards all-gathered).
  bool zero1 = false;
  // Progress (the library prints nothing): notes on data, model and resume,
  // and a report after every step.
  std::function<void(const std::string&)> on_message;
  std::function<void(const TrainStepReport&)> on_step;
};

// Every option in its range (messages name the option and the range), and
// for a new model its shape by config.json's rules (validate_config with the
// options' names). run_training calls it first.
void validate_train_options(const TrainOptions& o);

// Lower bound of the memory a training step holds, in bytes (saturating).
struct TrainMemory {
  uint64_t state = 0;        // parameters, gradients, AdamW moments
  uint64_t activations = 0;  // what the forward pass keeps for the backward pass
};
TrainMemory estimate_train_memory(const MonetConfig& c, int64_t batch, int64_t seq, size_t real_bytes);

// The model actually trained (new, --init or --resume; vocab_size from the
// tokenizer): validate_config, and the memory estimate against the machine
// (`available` overrides the measurement; 0: measure).
void check_train_model(const MonetConfig& c, const TrainOptions& o, uint64_t available = 0);

// Runs (or resumes) a training run; throws monet::Error on bad input.
void run_training(const TrainOptions& opts);

// One training-mode forward + backward from a checkpoint on `tokens` (B rows
// of T+1 ids) and writes losses, gradients and updated BatchNorm running stats
// to a safetensors file (F64), as described in docs/training.md.
void compute_gradients_to_file(const std::string& model_dir, const std::vector<std::vector<int32_t>>& tokens,
                               const std::string& out_path, const std::string& dtype, double aux_weight,
                               int threads = 0);

}  // namespace monet
