// monet info --model DIR: config, parameter count, dtype and bytes.
#include <cstdio>

#include "cli_util.h"
#include "commands.h"
#include "monet/model.h"

void add_info_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Print a checkpoint's configuration, parameter count, dtype and size");
  static std::string model_dir;
  static DeviceArgs device;
  add_model_option(cmd, model_dir);
  add_device_options(cmd, device);
  cmd->callback([] {
    auto model = monet::Model::load(model_dir, device.load_options());
    const monet::MonetConfig& c = model->config();
    std::printf("model            %s\n", model_dir.c_str());
    std::printf("decomposition    %s\n", c.decompose_name());
    std::printf("vocab_size       %lld\n", (long long)c.vocab_size);
    std::printf("hidden_size      %lld\n", (long long)c.hidden_size);
    std::printf("layers           %lld\n", (long long)c.num_hidden_layers);
    std::printf("heads            %lld (kv %lld, head_dim %lld)\n", (long long)c.num_attention_heads,
                (long long)c.num_key_value_heads, (long long)c.head_dim());
    std::printf("moe              experts %lld x %lld = %lld per group, heads %lld, dim %lld, topk %lld, groups %lld\n",
                (long long)c.moe_experts, (long long)c.moe_experts, (long long)(c.moe_experts * c.moe_experts),
                (long long)c.moe_heads, (long long)c.moe_dim, (long long)c.moe_topk, (long long)c.moe_groups);
    std::printf("router sigma     %.6f\n", c.router_sigma());
    std::printf("rope_theta       %g\n", c.rope_theta);
    std::printf("rms_norm_eps     %g\n", c.rms_norm_eps);
    std::printf("max_positions    %lld\n", (long long)c.max_position_embeddings);
    std::printf("tied embeddings  %s\n", c.tie_word_embeddings ? "yes" : "no");
    std::printf("torch_dtype      %s\n", c.torch_dtype.c_str());
    if (c.quant_block) std::printf("quantization     monet_q8_0 (int8 blocks of %lld, F16 scales)\n", (long long)c.quant_block);
    const long long params = model->parameter_count();
    std::printf("parameters       %lld (%.3f B)\n", params, double(params) / 1e9);
    std::printf("backend          %s\n", model->backend_name().c_str());
    std::printf("weight bytes     %zu (%.2f GiB)\n", model->weight_bytes(), double(model->weight_bytes()) / (1u << 30));
  });
}
