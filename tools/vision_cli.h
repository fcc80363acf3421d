// --image and its companions for the commands that run a model
// (generate, chat, experts): VisionMonet prompts with `<image>` placeholders.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "monet/vision.h"

namespace CLI { class App; }
namespace monet { class Model; }

struct VisionArgs {
  std::vector<std::string> images;
  std::string vision_tower, projector;
};
void add_vision_options(CLI::App* cmd, VisionArgs& args);

// The tower of the model's checkpoint and each --image's embeddings.
struct LoadedImages {
  std::unique_ptr<monet::VisionTower> tower;
  std::vector<std::vector<float>> embeds;  // per image [tokens_per_image, hidden]
};
LoadedImages load_images(const monet::Model& model, const VisionArgs& args);

// "1,-200,5": token ids, -200 (LLaVA's IMAGE_TOKEN_INDEX) where an image goes.
std::vector<int32_t> parse_ids_with_images(const std::string& text);
