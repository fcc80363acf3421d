// monet train --data TEXT|DIR --tokenizer DIR --out DIR [shape and optimiser flags]
// Trains a Monet model from scratch (or from --init, or --resume); see docs/training.md.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "commands.h"
#include "distributed.h"
#include "monet/error.h"
#include "monet/train.h"

namespace {

std::string format_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(std::fmod(s, 3600) / 60));
  else std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(std::fmod(s, 60)));
  return buf;
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train a Monet model on text (CPU; data parallel under mpirun: docs/distributed.md)");
  static monet::TrainOptions o;
  static std::string decompose = "vertical";
  o.shape.hidden_size = 256;
  o.shape.num_hidden_layers = 8;
  o.shape.num_attention_heads = 8;
  o.shape.num_key_value_heads = 8;
  o.shape.max_position_embeddings = 1024;
  o.shape.moe_experts = 64;
  o.shape.moe_heads = 4;
  o.shape.moe_dim = 16;
  o.shape.moe_topk = 2;
  o.shape.moe_groups = 2;
  o.shape.rms_norm_eps = 1e-6;
  auto* data = cmd->add_option("--data", o.data, "a UTF-8 text file or a folder of *.txt files");
  cmd->add_option("--tokenizer", o.tokenizer, "folder with tokenizer.model or tokenizer.json (copied into checkpoints)");
  cmd->add_option("--out", o.out, "output folder: train.csv, data cache, step-N checkpoints")->required();
  cmd->add_option("--init", o.init, "start from this checkpoint's weights and config instead of random init");
  cmd->add_flag("--resume", o.resume, "continue from the newest checkpoint in --out (same command line)");
  // model shape (random init)
  cmd->add_option("--hidden", o.shape.hidden_size, "hidden size (default 256)");
  cmd->add_option("--layers", o.shape.num_hidden_layers, "layers (default 8)");
  cmd->add_option("--heads", o.shape.num_attention_heads, "attention heads (default 8)");
  cmd->add_option("--kv-heads", o.shape.num_key_value_heads, "key/value heads (default 8)");
  cmd->add_option("--max-pos", o.shape.max_position_embeddings, "max_position_embeddings (default 1024)");
  cmd->add_option("--experts", o.shape.moe_experts, "experts per router side E (default 64: E^2 = 4096 experts)");
  cmd->add_option("--moe-heads", o.shape.moe_heads, "router heads H (default 4)");
  cmd->add_option("--moe-dim", o.shape.moe_dim, "expert dimension m (default 16)");
  cmd->add_option("--topk", o.shape.moe_topk, "moe_topk: experts kept per head on average (default 2)");
  cmd->add_option("--groups", o.shape.moe_groups, "layers sharing one router (default 2)");
  cmd->add_option("--decompose", decompose, "vertical (default) or horizontal");
  cmd->add_flag("--tie", o.shape.tie_word_embeddings, "tie lm_head to the embedding");
  // optimisation
  cmd->add_option("--steps", o.steps, "optimiser steps (default 1000)");
  cmd->add_option("--batch", o.batch, "sequences per micro-batch, all processes together (default 8)");
  cmd->add_option("--seq", o.seq, "tokens per sequence (default 256)");
  cmd->add_option("--grad-accum", o.grad_accum, "micro-batches per step (default 1)");
  cmd->add_option("--lr", o.lr, "peak learning rate (default 1e-3)");
  cmd->add_option("--warmup", o.warmup, "linear warm-up steps (default 100)");
  cmd->add_option("--min-lr-ratio", o.min_lr_ratio, "final lr / peak lr of the cosine (default 0.1)");
  cmd->add_option("--weight-decay", o.weight_decay, "AdamW weight decay on weight matrices (default 0.1)");
  cmd->add_option("--clip", o.clip, "gradient clipping global norm, 0 = off (default 1.0)");
  cmd->add_option("--aux-weight", o.aux_weight, "lambda of L_unif + L_amb (default 1e-3)");
  cmd->add_option("--seed", o.seed, "seed of init and data order (default 1234)");
  cmd->add_option("--init-std", o.init_std, "std of the normal init (default 0.02)");
  // evaluation, checkpoints
  cmd->add_option("--eval-every", o.eval_every, "validation every N steps, 0 = never (default 100)");
  cmd->add_option("--val-tokens", o.val_tokens, "validation tokens per evaluation (default 32768)");
  cmd->add_option("--val-fraction", o.val_fraction, "share of every document held out (default 0.02)");
  cmd->add_option("--save-every", o.save_every, "checkpoint every N steps (and at the end; default 500)");
  cmd->add_option("--keep", o.keep, "checkpoints kept, 0 = all (default 2)");
  cmd->add_option("--save-dtype", o.save_dtype, "model.safetensors dtype: f32 (default) or bf16");
  cmd->add_option("--log-every", o.log_every, "progress line every N steps when stderr is not a terminal (default 10)");
  cmd->add_option("--dtype", o.dtype, "compute type: f32 (default) or f64 (the reference)");
  cmd->add_option("--threads", o.threads, "CPU threads (default: all cores)");
  cmd->add_flag("--zero1", o.zero1, "under mpirun: shard the AdamW moments over the processes (ZeRO-1)");
  cmd->callback([data] {
    if (data->count() == 0) monet::fail("--data is required (a text file or a folder of .txt files)");
    if (decompose == "vertical") o.shape.moe_decompose = monet::Decompose::Vertical;
    else if (decompose == "horizontal") o.shape.moe_decompose = monet::Decompose::Horizontal;
    else monet::fail("--decompose must be vertical or horizontal, got '", decompose, "'");
    o.shape.torch_dtype = "float32";
    const bool tty = isatty(fileno(stderr));
    o.on_message = [](const std::string& text) { std::fprintf(stderr, "%s\n", text.c_str()); };
    o.on_step = [tty](const monet::TrainStepReport& r) {
      const bool val = !std::isnan(r.val_loss);
      if (tty || r.step % std::max<int64_t>(1, o.log_every) == 0 || val || r.step == r.steps) {
        std::fprintf(stderr, "%sstep %lld/%lld | loss %.4f (lm %.4f unif %.3f amb %.3f) | lr %.2e | %.0f tok/s | ETA %s%s",
                     tty ? "\r\033[K" : "", (long long)r.step, (long long)r.steps, r.loss, r.loss_lm, r.loss_unif,
                     r.loss_amb, r.lr, r.tokens_per_s, format_duration(r.eta_seconds).c_str(), tty ? "" : "\n");
        if (val) std::fprintf(stderr, "%sval loss %.4f (perplexity %.2f)\n", tty ? "\n" : "", r.val_loss, std::exp(r.val_loss));
      }
      if (!r.saved.empty()) std::fprintf(stderr, "%ssaved %s\n", tty ? "\n" : "", r.saved.c_str());
    };
    // Under mpirun/srun: data parallel over the launched processes (docs/distributed.md).
    o.comm = &world();
    monet::run_training(o);
  });
}
