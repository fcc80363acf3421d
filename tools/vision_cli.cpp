#include "vision_cli.h"

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include <CLI/CLI.hpp>

#include "monet/error.h"
#include "monet/model.h"

void add_vision_options(CLI::App* cmd, VisionArgs& args) {
  cmd->add_option("--image", args.images,
                  "image (JPEG, PNG, WebP) for a VisionMonet (llava_monet) model; repeatable, one <image> per image "
                  "in the prompt");
  cmd->add_option("--vision-tower", args.vision_tower, "CLIP vision tower directory (config.json, model.safetensors)");
  cmd->add_option("--projector", args.projector, "projector weights (.safetensors or torch .bin) instead of the checkpoint's");
}

LoadedImages load_images(const monet::Model& model, const VisionArgs& args) {
  LoadedImages li;
  monet::VisionLoadOptions vo;
  vo.vision_tower_dir = args.vision_tower;
  vo.projector_file = args.projector;
  li.tower = monet::VisionTower::load(model.dir(), model.config().hidden_size, model.backend(), vo);
  std::fprintf(stderr, "vision: %s\n", li.tower->describe().c_str());
  for (const std::string& path : args.images) li.embeds.push_back(li.tower->embed_image(monet::decode_image_file(path)));
  return li;
}

std::vector<int32_t> parse_ids_with_images(const std::string& text) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(start, end - start);
    char* stop = nullptr;
    errno = 0;
    const long long v = item.empty() ? 0 : std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0' || errno != 0 || (v < 0 && v != monet::kImageToken) || v > INT32_MAX)
      monet::fail("--ids: '", item, "' is not a token id or ", monet::kImageToken, " (an image)");
    ids.push_back(int32_t(v));
    start = end + 1;
  }
  return ids;
}
