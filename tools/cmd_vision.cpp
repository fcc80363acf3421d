// monet vision --image FILE --out FILE.safetensors [--crop] [--size N]
//   Decodes and preprocesses an image as a LLaVA/CLIP model sees it: writes
//   `image` [H, W, 3] U8 (the decoded RGB) and `pixel_values` [3, S, S] F32.
// monet vision --model DIR --image FILE... --out FILE [--ids 1,-200,5 | -p "<image>\n..."] [--mask FILE]
//   With a llava_monet checkpoint: per image i, pixel_values.i, features.i
//   (the selected vision hidden state) and image_embeds.i (projected); with
//   a prompt, the forward pass over text and image tokens: ids (I32, -200 at
//   image positions), logits [T, V] and router.{l}.g1/g2 [T, H, E].
#include <cstdio>

#include "cli_util.h"
#include "vision_cli.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/image.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"


void add_vision_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "vision", "Preprocess images as a vision model sees them; with --model, run the vision tower, the projector and a prompt");
  static std::string out_path, model_dir, vision_tower, projector, ids_text, prompt, mask_path;
  static std::vector<std::string> images;
  static bool center_crop = false;
  static int64_t size = 224;
  static DeviceArgs device;
  cmd->add_option("--image", images, "JPEG, PNG or WebP file (repeatable)")->required();
  cmd->add_option("--out", out_path, "output .safetensors file")->required();
  auto* crop_opt = cmd->add_flag("--crop", center_crop,
                                 "without --model: resize the shortest edge and centre-crop (CLIPImageProcessor alone) "
                                 "instead of LLaVA's pad to a square");
  auto* size_opt = cmd->add_option("--size", size, "without --model: shortest edge and crop size (default 224)")
                       ->check(CLI::Range(1, 4096));
  auto* model_opt = cmd->add_option("--model", model_dir, "a llava_monet checkpoint directory");
  cmd->add_option("--vision-tower", vision_tower, "CLIP vision tower directory (config.json, model.safetensors)")
      ->needs(model_opt);
  cmd->add_option("--projector", projector, "projector weights (.safetensors or torch .bin) instead of the checkpoint's")
      ->needs(model_opt);
  auto* ids_opt = cmd->add_option("--ids", ids_text, "prompt as token ids, -200 where an image goes")->needs(model_opt);
  cmd->add_option("-p,--prompt", prompt, "prompt text with one <image> per --image")->needs(model_opt)->excludes(ids_opt);
  cmd->add_option("--mask", mask_path, "JSON file of experts to remove (applies to image tokens too)")->needs(model_opt);
  add_device_options(cmd, device);
  crop_opt->excludes(model_opt);
  size_opt->excludes(model_opt);
  cmd->callback([] {
    std::vector<monet::TensorToWrite> out;
    std::map<std::string, std::string> meta;
    std::vector<monet::Image> decoded;
    for (const std::string& path : images) decoded.push_back(monet::decode_image_file(path));

    if (model_dir.empty()) {
      monet::ClipPreprocess p;
      p.pad_to_square = !center_crop;
      p.shortest_edge = p.crop_height = p.crop_width = size;
      std::vector<std::vector<float>> pixels;
      for (size_t i = 0; i < decoded.size(); i++) {
        pixels.push_back(monet::clip_preprocess(decoded[i], p));
        const std::string sfx = images.size() > 1 ? "." + std::to_string(i) : "";
        out.push_back({"image" + sfx, monet::DType::U8, {decoded[i].height, decoded[i].width, 3}, decoded[i].rgb.data()});
        out.push_back({"pixel_values" + sfx, monet::DType::F32, {3, size, size}, pixels.back().data()});
        std::printf("%s: %lldx%lld -> pixel_values [3, %lld, %lld] (%s)\n", images[i].c_str(),
                    (long long)decoded[i].width, (long long)decoded[i].height, (long long)size, (long long)size,
                    center_crop ? "centre crop" : "padded to a square");
      }
      monet::write_safetensors(out_path, out, {{"mode", center_crop ? "crop" : "pad"}});
      return;
    }

    auto model = monet::Model::load(model_dir, device.load_options());
    const monet::MonetConfig& c = model->config();
    monet::VisionLoadOptions vo;
    vo.vision_tower_dir = vision_tower;
    vo.projector_file = projector;
    auto tower = monet::VisionTower::load(model_dir, c.hidden_size, model->backend(), vo);
    std::fprintf(stderr, "vision: %s\n", tower->describe().c_str());
    const monet::ClipPreprocess& pp = tower->preprocess();
    const int64_t n = tower->tokens_per_image(), D = tower->clip().hidden_size;
    std::vector<std::vector<float>> pixels, feats, embeds;
    for (size_t i = 0; i < decoded.size(); i++) {
      pixels.push_back(monet::clip_preprocess(decoded[i], pp));
      feats.push_back(tower->encode(pixels.back().data(), 1));
      embeds.push_back(tower->project(feats.back().data(), n));
      const std::string sfx = "." + std::to_string(i);
      out.push_back({"pixel_values" + sfx, monet::DType::F32, {3, pp.crop_height, pp.crop_width}, pixels.back().data()});
      out.push_back({"features" + sfx, monet::DType::F32, {n, D}, feats.back().data()});
      out.push_back({"image_embeds" + sfx, monet::DType::F32, {n, c.hidden_size}, embeds.back().data()});
    }

    std::vector<int32_t> ids;
    if (!ids_text.empty()) ids = parse_ids_with_images(ids_text);
    if (!prompt.empty()) {
      const auto tok = monet::Tokenizer::load_dir(model_dir);
      ids = monet::tokenize_with_images(*tok, prompt);
    }
    monet::MultimodalPrompt mp;
    std::vector<float> logits;
    monet::RouterCapture capture;
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!mask_path.empty()) mask = monet::ExpertMask::load_json(mask_path, c);
    if (!ids.empty()) {
      mp = monet::build_multimodal_prompt(*model, ids, embeds, n);
      const int64_t T = mp.size();
      if (T > c.max_position_embeddings)
        monet::fail("the prompt is ", T, " tokens with its images, over max_position_embeddings = ",
                    c.max_position_embeddings);
      monet::KvCache cache = model->new_cache(T);
      std::vector<monet::Sequence> seqs(1);
      seqs[0].cache = &cache;
      seqs[0].embeds = mp.embeds.data();
      seqs[0].n = T;
      seqs[0].logits = monet::Logits::All;
      seqs[0].logits_out = &logits;
      seqs[0].routing = &capture;
      seqs[0].mask = &mask;
      model->forward_batch(seqs);
      out.push_back({"ids", monet::DType::I32, {T}, mp.ids.data()});
      out.push_back({"logits", monet::DType::F32, {T, c.vocab_size}, logits.data()});
      for (int64_t r = 0; r < c.num_router_layers(); r++) {
        const std::string layer = std::to_string(r * c.moe_groups);
        out.push_back({"router." + layer + ".g1", monet::DType::F32, {T, c.moe_heads, c.moe_experts},
                       capture.g1[size_t(r)].data()});
        out.push_back({"router." + layer + ".g2", monet::DType::F32, {T, c.moe_heads, c.moe_experts},
                       capture.g2[size_t(r)].data()});
      }
    }
    monet::write_safetensors(out_path, out, {{"model", model_dir}});
  });
}
