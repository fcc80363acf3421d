// monet eval-loss --model DIR --data FILE [--context N] [--mask FILE]
// Mean per-token loss and perplexity of a checkpoint on a text file.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/evaluate.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"

void add_eval_loss_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval-loss", "Mean per-token loss and perplexity of a checkpoint on a text file");
  static std::string model_dir, data_path, mask_path;
  static int64_t context = 512;
  static DeviceArgs device;
  static bool as_json = false;
  add_model_option(cmd, model_dir);
  cmd->add_option("--data", data_path, "UTF-8 text file")->required();
  cmd->add_option("--context", context, "tokens per evaluation window, BOS included (default 512)");
  cmd->add_option("--mask", mask_path, "JSON file of experts to remove");
  add_device_options(cmd, device);
  cmd->add_flag("--json", as_json, "print one JSON object");
  cmd->callback([] {
    const std::string text = monet::read_file(data_path);
    auto model = monet::Model::load(model_dir, device.load_options());
    auto tok = monet::Tokenizer::load_dir(model_dir);
    const monet::MonetConfig& c = model->config();
    if (context > c.max_position_embeddings)
      monet::fail("--context ", context, " exceeds max_position_embeddings = ", c.max_position_embeddings);
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!mask_path.empty()) mask = monet::ExpertMask::load_json(mask_path, c);
    const std::vector<int32_t> ids = tok->encode(text, false);
    if (ids.empty()) monet::fail(data_path, ": no tokens to evaluate");
    const monet::LossResult r = monet::evaluate_loss(*model, ids, context, tok->bos_id(), &mask);
    if (as_json)
      std::printf("{\"tokens\": %lld, \"loss\": %.6f, \"perplexity\": %.4f}\n", (long long)r.tokens, r.mean(),
                  std::exp(r.mean()));
    else
      std::printf("tokens %lld  loss %.4f  perplexity %.3f\n", (long long)r.tokens, r.mean(), std::exp(r.mean()));
  });
}
