// Images: decoding JPEG, PNG and WebP files into RGB8, and the CLIP
// preprocessing of LLaVA-style models (pad to a square or centre-crop,
// Pillow's bicubic resize, normalisation), equal to Hugging Face's
// CLIPImageProcessor on the image PIL decodes.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace monet {

// An 8-bit RGB image, rows top to bottom, pixels left to right: [height, width, 3].
struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;

  uint8_t* pixel(int64_t x, int64_t y) { return rgb.data() + size_t((y * width + x) * 3); }
  const uint8_t* pixel(int64_t x, int64_t y) const { return rgb.data() + size_t((y * width + x) * 3); }
};

// What a decoder accepts: the dimensions are checked from the header, before
// any pixel memory is allocated, so a small file that claims a huge image (a
// decompression bomb) is refused cheaply.
struct ImageLimits {
  int64_t max_pixels = 64ll << 20;          // width * height (64 Mpx: 192 MiB of RGB)
  size_t max_file_bytes = size_t(256) << 20;
  int max_jpeg_scans = 256;                 // progressive JPEGs: more scans than any encoder writes
};

enum class ImageFormat { Unknown, Jpeg, Png, Webp };
const char* image_format_name(ImageFormat f);  // "JPEG", "PNG", "WebP", "unknown"
// The format the first bytes announce (magic numbers, not the file name).
ImageFormat sniff_image_format(const uint8_t* data, size_t n);

// Decodes to RGB as PIL's Image.open(...).convert("RGB") does: grey is
// replicated, alpha is dropped (not composited), palettes are expanded,
// 16-bit samples keep their high byte, CMYK JPEGs use PIL's Adobe
// convention; no EXIF rotation, no colour management. monet::Error naming
// `name` for a truncated or corrupt file, another format, an animated WebP,
// or an image over the limits.
Image decode_image(const uint8_t* data, size_t n, const std::string& name, const ImageLimits& limits = {});
Image decode_image_file(const std::string& path, const ImageLimits& limits = {});

// Pillow's Image.resize(..., Image.BICUBIC) of an RGB image, bit for bit:
// separable convolution (horizontal pass, then vertical), support scaled by
// the reduction factor (antialiasing), 22-bit fixed-point coefficients, each
// pass rounded and clipped to uint8.
Image resize_bicubic(const Image& in, int64_t width, int64_t height);

// LLaVA's expand2square: the image centred on a square canvas of its longer
// side, filled with `fill` (left/top offset (long - short) / 2, rounded down).
Image expand_to_square(const Image& in, std::array<uint8_t, 3> fill);

// CLIPImageProcessor's settings (those of openai/clip-vit-*), plus LLaVA's
// image_aspect_ratio: "pad" first expands the image to a square filled with
// the mean colour (int(mean * 255) per channel), so nothing is cropped away.
struct ClipPreprocess {
  bool pad_to_square = true;      // image_aspect_ratio "pad"; false: resize + centre crop only
  int64_t shortest_edge = 224;    // size["shortest_edge"]
  int64_t crop_height = 224, crop_width = 224;
  std::array<double, 3> mean{0.48145466, 0.4578275, 0.40821073};
  std::array<double, 3> std{0.26862954, 0.26130258, 0.27577711};
  double rescale = 1.0 / 255.0;
};

// The image as the vision tower sees it, before normalisation: padded to a
// square (pad_to_square), resized, centre-cropped: RGB8 [crop_height, crop_width].
Image clip_preprocess_rgb(const Image& image, const ClipPreprocess& p = {});

// pixel_values [3, crop_height, crop_width] (channels first), float32
// computed as the processor does: (float32(u8 * rescale) - mean) / std.
std::vector<float> clip_preprocess(const Image& image, const ClipPreprocess& p = {});

}  // namespace monet
