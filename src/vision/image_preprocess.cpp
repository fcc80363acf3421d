// CLIP preprocessing as Hugging Face's CLIPImageProcessor does it on a PIL
// image, with LLaVA's pad-to-square in front. The resize is Pillow's
// convolution resampler (libImaging/Resample.c) reproduced operation for
// operation, so the uint8 image after resizing is the one PIL gives.
#include <cmath>
#include <cstring>

#include "monet/error.h"
#include "monet/image.h"

namespace monet {

namespace {

// Pillow's bicubic kernel (a = -0.5), support 2.
double bicubic_kernel(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

constexpr int kPrecisionBits = 32 - 8 - 2;  // fixed-point bits of the coefficients

// The filter taps of one axis: output i reads inputs [first[i], first[i] + count[i])
// with weights taps[i * ksize + k], in fixed point.
struct Taps {
  int64_t ksize = 0;
  std::vector<int64_t> first, count;
  std::vector<int32_t> taps;
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for a box [0, in_size).
Taps precompute_taps(int64_t in_size, int64_t out_size) {
  const float in0 = 0.0f, in1 = float(in_size);
  const double scale = double(in1 - in0) / double(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;  // widen the kernel when reducing: antialiasing
  const double support = 2.0 * filterscale;
  Taps t;
  t.ksize = int64_t(std::ceil(support)) * 2 + 1;
  t.first.resize(size_t(out_size));
  t.count.resize(size_t(out_size));
  t.taps.assign(size_t(out_size * t.ksize), 0);
  std::vector<double> w(size_t(t.ksize));
  for (int64_t i = 0; i < out_size; i++) {
    const double center = in0 + (double(i) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = int64_t(int(center - support + 0.5));  // C's truncating cast, as Pillow
    if (xmin < 0) xmin = 0;
    int64_t xmax = int64_t(int(center + support + 0.5));
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; x++) {
      w[size_t(x)] = bicubic_kernel((double(x + xmin) - center + 0.5) * ss);
      ww += w[size_t(x)];
    }
    for (int64_t x = 0; x < xmax; x++) {
      double k = w[size_t(x)];
      if (ww != 0.0) k /= ww;
      // round half away from zero into 22-bit fixed point
      t.taps[size_t(i * t.ksize + x)] =
          k < 0 ? int32_t(-0.5 + k * (1 << kPrecisionBits)) : int32_t(0.5 + k * (1 << kPrecisionBits));
    }
    t.first[size_t(i)] = xmin;
    t.count[size_t(i)] = xmax;
  }
  return t;
}

// Pillow's clip8: the accumulator (with its rounding bias) shifted back and clamped.
inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;  // arithmetic shift (C++20)
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

}  // namespace

Image resize_bicubic(const Image& in, int64_t width, int64_t height) {
  if (width <= 0 || height <= 0) fail("resize_bicubic: bad output size ", width, "x", height);
  if (in.width <= 0 || in.height <= 0) fail("resize_bicubic: empty input image");
  if (width == in.width && height == in.height) return in;  // PIL returns a copy
  const Taps th = precompute_taps(in.width, width);
  const Taps tv = precompute_taps(in.height, height);
  const bool need_horizontal = width != in.width, need_vertical = height != in.height;

  // Horizontal pass over only the rows the vertical pass reads.
  const int64_t row_first = tv.first[0];
  const int64_t row_last = tv.first[size_t(height - 1)] + tv.count[size_t(height - 1)];
  Image tmp;
  const Image* src = &in;
  int64_t src_row0 = 0;  // row of `src` that vertical bounds are relative to
  if (need_horizontal) {
    tmp.width = width;
    tmp.height = row_last - row_first;
    tmp.rgb.resize(size_t(tmp.width * tmp.height * 3));
    for (int64_t y = 0; y < tmp.height; y++) {
      const uint8_t* in_row = in.pixel(0, y + row_first);
      uint8_t* out_row = tmp.pixel(0, y);
      for (int64_t x = 0; x < width; x++) {
        const int32_t* k = &th.taps[size_t(x * th.ksize)];
        const uint8_t* p = in_row + th.first[size_t(x)] * 3;
        int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
        for (int64_t i = 0; i < th.count[size_t(x)]; i++) {
          r += int32_t(p[i * 3 + 0]) * k[i];
          g += int32_t(p[i * 3 + 1]) * k[i];
          b += int32_t(p[i * 3 + 2]) * k[i];
        }
        out_row[x * 3 + 0] = clip8(r);
        out_row[x * 3 + 1] = clip8(g);
        out_row[x * 3 + 2] = clip8(b);
      }
    }
    src = &tmp;
    src_row0 = row_first;
  }
  if (!need_vertical) return need_horizontal ? tmp : in;

  Image out;
  out.width = src->width;
  out.height = height;
  out.rgb.resize(size_t(out.width * out.height * 3));
  for (int64_t y = 0; y < height; y++) {
    const int32_t* k = &tv.taps[size_t(y * tv.ksize)];
    const int64_t y0 = tv.first[size_t(y)] - src_row0, n = tv.count[size_t(y)];
    uint8_t* out_row = out.pixel(0, y);
    for (int64_t x = 0; x < out.width; x++) {
      int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
      for (int64_t i = 0; i < n; i++) {
        const uint8_t* p = src->pixel(x, y0 + i);
        r += int32_t(p[0]) * k[i];
        g += int32_t(p[1]) * k[i];
        b += int32_t(p[2]) * k[i];
      }
      out_row[x * 3 + 0] = clip8(r);
      out_row[x * 3 + 1] = clip8(g);
      out_row[x * 3 + 2] = clip8(b);
    }
  }
  return out;
}

Image expand_to_square(const Image& in, std::array<uint8_t, 3> fill) {
  if (in.width == in.height) return in;
  const int64_t side = std::max(in.width, in.height);
  Image out;
  out.width = out.height = side;
  out.rgb.resize(size_t(side * side * 3));
  for (int64_t i = 0; i < side * side; i++) std::memcpy(&out.rgb[size_t(i * 3)], fill.data(), 3);
  const int64_t x0 = (side - in.width) / 2, y0 = (side - in.height) / 2;
  for (int64_t y = 0; y < in.height; y++)
    std::memcpy(out.pixel(x0, y0 + y), in.pixel(0, y), size_t(in.width * 3));
  return out;
}

Image clip_preprocess_rgb(const Image& image, const ClipPreprocess& p) {
  if (image.width <= 0 || image.height <= 0) fail("clip_preprocess: empty image");
  if (p.shortest_edge <= 0 || p.crop_height <= 0 || p.crop_width <= 0)
    fail("clip_preprocess: bad sizes (shortest edge ", p.shortest_edge, ", crop ", p.crop_height, "x", p.crop_width, ")");
  if (p.crop_height > p.shortest_edge || p.crop_width > p.shortest_edge)
    fail("clip_preprocess: a crop (", p.crop_height, "x", p.crop_width, ") larger than the shortest edge (",
         p.shortest_edge, ") would need padding, which is not supported");

  const Image* img = &image;
  Image squared;
  if (p.pad_to_square) {
    // LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
    std::array<uint8_t, 3> fill;
    for (int c = 0; c < 3; c++) fill[size_t(c)] = uint8_t(int(p.mean[size_t(c)] * 255));
    squared = expand_to_square(image, fill);
    img = &squared;
  }

  // Shortest edge to p.shortest_edge, the other as int(size * long / short) (transformers).
  const int64_t w = img->width, h = img->height;
  int64_t new_w, new_h;
  if (w <= h) {
    new_w = p.shortest_edge;
    new_h = int64_t(double(p.shortest_edge * h) / double(w));
  } else {
    new_h = p.shortest_edge;
    new_w = int64_t(double(p.shortest_edge * w) / double(h));
  }
  const Image resized = resize_bicubic(*img, new_w, new_h);

  // Centre crop (top/left rounded down).
  const int64_t top = (new_h - p.crop_height) / 2, left = (new_w - p.crop_width) / 2;
  Image out;
  out.width = p.crop_width;
  out.height = p.crop_height;
  out.rgb.resize(size_t(out.width * out.height * 3));
  for (int64_t y = 0; y < out.height; y++)
    std::memcpy(out.pixel(0, y), resized.pixel(left, top + y), size_t(out.width * 3));
  return out;
}

std::vector<float> clip_preprocess(const Image& image, const ClipPreprocess& p) {
  const Image cropped = clip_preprocess_rgb(image, p);
  // Rescale, normalise; channels first.
  const int64_t plane = p.crop_height * p.crop_width;
  std::vector<float> out(size_t(3 * plane));
  for (int c = 0; c < 3; c++) {
    const float mean = float(p.mean[size_t(c)]), std = float(p.std[size_t(c)]);
    for (int64_t y = 0; y < p.crop_height; y++) {
      for (int64_t x = 0; x < p.crop_width; x++) {
        const float v = float(double(cropped.pixel(x, y)[c]) * p.rescale);
        out[size_t(c * plane + y * p.crop_width + x)] = (v - mean) / std;
      }
    }
  }
  return out;
}

}  // namespace monet
