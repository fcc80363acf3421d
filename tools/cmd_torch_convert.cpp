// monet torch-to-safetensors IN.bin OUT.safetensors
// Converts a torch.save checkpoint holding a dict of tensors (e.g. LLaVA's
// mm_projector.bin) to safetensors, read with the safe reader: nothing in the
// pickle is executed, anything but tensors is refused.
#include <cstdio>

#include "commands.h"
#include "monet/error.h"
#include "monet/torch_checkpoint.h"

void add_torch_convert_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("torch-to-safetensors",
                                 "Convert a torch.save dict of tensors (e.g. mm_projector.bin) to safetensors, safely");
  static std::string in_path, out_path;
  cmd->add_option("input", in_path, "torch.save file (.bin/.pt, zip format)")->required();
  cmd->add_option("output", out_path, "output .safetensors file")->required();
  cmd->callback([] {
    const monet::TorchCheckpoint ckpt(in_path);
    std::vector<monet::TensorToWrite> out;
    for (const monet::TensorInfo& t : ckpt.tensors()) out.push_back({t.name, t.dtype, t.shape, t.data});
    monet::write_safetensors(out_path, out, {{"format", "pt"}, {"converted_from", in_path}});
    for (const monet::TensorInfo& t : ckpt.tensors())
      std::printf("%-48s %-5s %s\n", t.name.c_str(), monet::dtype_name(t.dtype), t.shape_str().c_str());
  });
}
