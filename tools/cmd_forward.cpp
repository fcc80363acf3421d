// monet forward --model DIR --ids 1,5,9 --out FILE.safetensors
// Writes logits [T, V] and, per router layer l, router.{l}.g1 / g2 [T, H, E].
#include <algorithm>
#include <map>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/safetensors.h"

void add_forward_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("forward", "Run a full forward pass and write logits and router probabilities");
  static std::string model_dir, ids_text, out_path, mask_path;
  static DeviceArgs device;
  static int64_t chunk = 0;
  add_model_option(cmd, model_dir);
  cmd->add_option("--ids", ids_text, "comma-separated token ids, e.g. 1,5,9")->required();
  cmd->add_option("--out", out_path, "output .safetensors file")->required();
  add_device_options(cmd, device);
  cmd->add_option("--chunk", chunk,
                  "feed the sequence through the KV cache this many tokens at a time (1 = token-by-token decoding)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--mask", mask_path, "JSON file of experts to remove (see README: Expert masks)");
  cmd->callback([] {
    const std::vector<int32_t> ids = parse_id_list(ids_text);
    auto model = monet::Model::load(model_dir, device.load_options());
    const monet::MonetConfig& c = model->config();
    const int64_t T = int64_t(ids.size()), V = c.vocab_size;
    const int64_t step = chunk > 0 ? chunk : T;
    const int64_t R = c.num_router_layers();
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!mask_path.empty()) mask = monet::ExpertMask::load_json(mask_path, c);

    monet::KvCache cache = model->new_cache(T);
    std::vector<float> logits(size_t(T * V)), chunk_logits;
    std::vector<std::vector<float>> g1(static_cast<size_t>(R)), g2(static_cast<size_t>(R));
    for (int64_t start = 0; start < T; start += step) {
      const int64_t n = std::min(step, T - start);
      monet::RouterCapture capture;
      monet::ForwardOptions fo;
      fo.capture = &capture;
      fo.mask = &mask;
      model->forward(cache, ids.data() + start, n, chunk_logits, fo);
      std::copy(chunk_logits.begin(), chunk_logits.end(), logits.begin() + start * V);
      for (int64_t r = 0; r < R; r++) {
        g1[size_t(r)].insert(g1[size_t(r)].end(), capture.g1[size_t(r)].begin(), capture.g1[size_t(r)].end());
        g2[size_t(r)].insert(g2[size_t(r)].end(), capture.g2[size_t(r)].begin(), capture.g2[size_t(r)].end());
      }
    }

    std::vector<monet::TensorToWrite> out;
    out.push_back({"logits", monet::DType::F32, {T, V}, logits.data()});
    for (int64_t r = 0; r < R; r++) {
      const std::string layer = std::to_string(r * c.moe_groups);
      out.push_back({"router." + layer + ".g1", monet::DType::F32, {T, c.moe_heads, c.moe_experts}, g1[size_t(r)].data()});
      out.push_back({"router." + layer + ".g2", monet::DType::F32, {T, c.moe_heads, c.moe_experts}, g2[size_t(r)].data()});
    }
    monet::write_safetensors(out_path, out, {{"model", model_dir}});
  });
}
