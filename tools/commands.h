// Subcommands of the `monet` binary. Each add_*_command registers a CLI11
// subcommand whose callback throws monet::Error on failure; main() reports it.
#pragma once
#include <CLI/CLI.hpp>

void add_info_command(CLI::App& app);
void add_forward_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_experts_command(CLI::App& app);
void add_chat_command(CLI::App& app);
void add_eval_loss_command(CLI::App& app);
void add_find_experts_command(CLI::App& app);
void add_index_command(CLI::App& app);
void add_serve_command(CLI::App& app);
void add_plot_loss_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_grad_command(CLI::App& app);
void add_vision_command(CLI::App& app);
void add_torch_convert_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
