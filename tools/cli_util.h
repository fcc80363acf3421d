// Small helpers shared by the subcommands.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// "1,5,9" -> {1, 5, 9}; throws monet::Error naming the bad item.
std::vector<int32_t> parse_id_list(const std::string& text);

namespace CLI { class App; class Option; }
namespace monet { struct LoadOptions; }

// --device and --threads of the commands that run a model.
struct DeviceArgs {
  std::string device = "cpu";
  int threads = 0;
  std::string compute = "auto";
  bool huge_pages = false;
  monet::LoadOptions load_options() const;
};
void add_device_options(CLI::App* cmd, DeviceArgs& args);

// The model used when --model is not given: $MONET_MODEL, else the embedded
// default model shipped under models/ (next to the binary's build tree or in
// the source tree). Empty when none is found.
std::string default_model_dir();

// Registers --model DIR on `cmd`, defaulting to default_model_dir(); parsing
// fails with a clear message when neither is available.
CLI::Option* add_model_option(CLI::App* cmd, std::string& dir, const std::string& what = "checkpoint directory");
