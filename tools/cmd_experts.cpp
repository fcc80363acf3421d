// monet experts --model DIR (-p TEXT | --ids 1,5,9) [--image FILE...] [--threshold 0.01] [--top N] [--json]
// With images (VisionMonet), every image patch is a position of its own.
// For every token and router group: the composed experts (id = i*E + j) whose
// probability sum_h g1[h,i] g2[h,j] exceeds the threshold.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/interp.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"
#include "vision_cli.h"

void add_experts_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("experts", "Show which experts each token activates, per router group");
  static std::string model_dir, prompt, ids_text, mask_path;
  static float threshold = 0.01f;
  static int top = 10;
  static DeviceArgs device;
  static bool as_json = false;
  static VisionArgs vision;
  add_model_option(cmd, model_dir);
  auto* p = cmd->add_option("-p,--prompt", prompt, "text to route");
  cmd->add_option("--ids", ids_text, "token ids instead of text")->excludes(p);
  cmd->add_option("--threshold", threshold, "report experts with probability above this (default 0.01)");
  cmd->add_option("--top", top, "at most this many experts per token and group in text output (0 = all)");
  add_device_options(cmd, device);
  cmd->add_option("--mask", mask_path, "JSON file of experts to remove");
  cmd->add_flag("--json", as_json, "machine-readable output (all experts above the threshold)");
  add_vision_options(cmd, vision);
  cmd->callback([] {
    if (prompt.empty() && ids_text.empty()) monet::fail("experts: give -p TEXT or --ids 1,5,9");
    auto model = monet::Model::load(model_dir, device.load_options());
    const monet::MonetConfig& c = model->config();
    std::unique_ptr<monet::Tokenizer> tok;
    try {
      tok = monet::Tokenizer::load_dir(model_dir);
    } catch (const monet::Error&) {
      if (!prompt.empty()) throw;
    }
    const bool with_images = !vision.images.empty();
    std::vector<int32_t> ids;
    if (with_images)
      ids = ids_text.empty()
                ? monet::tokenize_with_images(*tok, monet::with_image_placeholders(prompt, vision.images.size()))
                : parse_ids_with_images(ids_text);
    else ids = ids_text.empty() ? tok->encode(prompt, true) : parse_id_list(ids_text);
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!mask_path.empty()) mask = monet::ExpertMask::load_json(mask_path, c);
    monet::RouterCapture cap;
    monet::MultimodalPrompt mp;  // with images: per position, the image and patch it holds
    int64_t grid = 0;
    if (with_images) {
      const LoadedImages li = load_images(*model, vision);
      mp = monet::build_multimodal_prompt(*model, ids, li.embeds, li.tower->tokens_per_image());
      grid = li.tower->clip().grid();
      if (li.tower->llava().select_feature == "cls_patch") grid = -grid;  // patch 0 is the CLS token
      ids = mp.ids;
      monet::KvCache cache = model->new_cache(mp.size());
      std::vector<monet::Sequence> seqs(1);
      seqs[0].cache = &cache;
      seqs[0].embeds = mp.embeds.data();
      seqs[0].n = mp.size();
      seqs[0].logits = monet::Logits::None;
      seqs[0].routing = &cap;
      seqs[0].mask = &mask;
      monet::BatchOptions bo;
      bo.routing_only = true;
      model->forward_batch(seqs, bo);
    } else {
      monet::KvCache cache = model->new_cache(int64_t(ids.size()));
      monet::ForwardOptions fo;
      fo.capture = &cap;
      fo.mask = &mask;
      std::vector<float> logits;
      model->forward(cache, ids.data(), int64_t(ids.size()), logits, fo);
    }

    const int64_t H = c.moe_heads, E = c.moe_experts;
    nlohmann::json out = {{"model", model_dir}, {"experts_per_group", E * E}, {"threshold", threshold},
                          {"tokens", nlohmann::json::array()}};
    for (size_t t = 0; t < ids.size(); t++) {
      nlohmann::json jt = {{"position", t}, {"id", ids[t]}, {"groups", nlohmann::json::array()}};
      if (with_images && mp.image[t] >= 0) {
        // An image patch: where it lies in the image's grid of patches (row, column from the top left).
        const int64_t g = std::abs(grid), k = mp.patch[t] - (grid < 0 ? 1 : 0);
        jt["image"] = mp.image[t];
        jt["patch"] = mp.patch[t];
        std::string where = "cls";
        if (k >= 0) {
          jt["row"] = k / g;
          jt["col"] = k % g;
          where = "row " + std::to_string(k / g) + ", col " + std::to_string(k % g);
        }
        if (!as_json) std::printf("%3zu  image %d patch %d (%s)\n", t, mp.image[t], mp.patch[t], where.c_str());
      } else {
        const std::string piece = tok ? tok->token_text(ids[t]) : std::to_string(ids[t]);
        jt["piece"] = piece;
        if (!as_json) std::printf("%3zu  %-16s (id %d)\n", t, ("\"" + piece + "\"").c_str(), ids[t]);
      }
      for (size_t g = 0; g < cap.g1.size(); g++) {
        const auto [act, removed] = monet::token_experts(cap, t, g, H, E, threshold, &mask);
        auto to_json = [](const std::vector<monet::ExpertActivation>& list) {
          nlohmann::json je = nlohmann::json::array();
          for (const auto& a : list) je.push_back({{"id", a.id}, {"i", a.i}, {"j", a.j}, {"p", a.prob}});
          return je;
        };
        nlohmann::json jg = {{"group", g}, {"count", act.size()}, {"experts", to_json(act)}};
        if (!mask_path.empty()) jg["removed"] = to_json(removed);
        jt["groups"].push_back(jg);
        if (!as_json) {
          std::printf("     group %zu: %zu experts > %g", g, act.size(), threshold);
          if (!removed.empty()) std::printf(" (%zu more removed by the mask)", removed.size());
          std::printf(":");
          for (size_t k = 0; k < act.size() && (top == 0 || int(k) < top); k++)
            std::printf(" %lld(%.3f)", (long long)act[k].id, act[k].prob);
          if (top != 0 && int(act.size()) > top) std::printf(" ...");
          std::printf("\n");
        }
      }
      out["tokens"].push_back(jt);
    }
    if (as_json) std::printf("%s\n", out.dump().c_str());
  });
}
