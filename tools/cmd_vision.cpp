// monet vision --image FILE --out FILE.safetensors [--crop]
// Decodes an image and preprocesses it as a LLaVA/CLIP model sees it; writes
// `image` [H, W, 3] U8 (the decoded RGB) and `pixel_values` [3, S, S] F32.
#include <cstdio>

#include "commands.h"
#include "monet/error.h"
#include "monet/image.h"
#include "monet/safetensors.h"

void add_vision_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("vision", "Decode and preprocess an image as a vision model sees it");
  static std::string image_path, out_path;
  static bool center_crop = false;
  static int64_t size = 224;
  cmd->add_option("--image", image_path, "JPEG, PNG or WebP file")->required();
  cmd->add_option("--out", out_path, "output .safetensors file (image [H, W, 3] U8, pixel_values [3, S, S] F32)")
      ->required();
  cmd->add_flag("--crop", center_crop,
                "resize the shortest edge and centre-crop (CLIPImageProcessor alone) instead of LLaVA's pad to a square");
  cmd->add_option("--size", size, "shortest edge and crop size (default 224)")->check(CLI::Range(1, 4096));
  cmd->callback([] {
    const monet::Image img = monet::decode_image_file(image_path);
    monet::ClipPreprocess p;
    p.pad_to_square = !center_crop;
    p.shortest_edge = p.crop_height = p.crop_width = size;
    const std::vector<float> pixels = monet::clip_preprocess(img, p);
    std::vector<monet::TensorToWrite> out;
    out.push_back({"image", monet::DType::U8, {img.height, img.width, 3}, img.rgb.data()});
    out.push_back({"pixel_values", monet::DType::F32, {3, size, size}, pixels.data()});
    monet::write_safetensors(out_path, out, {{"image", image_path}, {"mode", center_crop ? "crop" : "pad"}});
    std::printf("%s: %lldx%lld -> pixel_values [3, %lld, %lld] (%s)\n", image_path.c_str(), (long long)img.width,
                (long long)img.height, (long long)size, (long long)size, center_crop ? "centre crop" : "padded to a square");
  });
}
