// Image decoding robustness (every truncation, random corruption, the
// progressive-scan limit, lossless round trips) and resampling invariants.
// Exactness against PIL and CLIPImageProcessor: tests/python/test_vision_image.py.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <csetjmp>
#include <cstdio>
#include <random>

#include <jpeglib.h>
#include <png.h>
#include <webp/encode.h>

#include "monet/error.h"
#include "monet/image.h"
#include "monet/vision.h"

namespace {

monet::Image test_pattern(int64_t w, int64_t h) {
  monet::Image img;
  img.width = w;
  img.height = h;
  img.rgb.resize(size_t(w * h * 3));
  for (int64_t y = 0; y < h; y++)
    for (int64_t x = 0; x < w; x++) {
      uint8_t* p = img.pixel(x, y);
      p[0] = uint8_t(x * 255 / (w - 1));
      p[1] = uint8_t(y * 255 / (h - 1));
      p[2] = uint8_t((x * 7 + y * 13) % 256);
    }
  return img;
}

std::vector<uint8_t> encode_jpeg(const monet::Image& img, bool progressive) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);  // encoding our own pattern cannot fail
  jpeg_create_compress(&c);
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buf, &size);
  c.image_width = JDIMENSION(img.width);
  c.image_height = JDIMENSION(img.height);
  c.input_components = 3;
  c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 90, TRUE);
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(img.pixel(0, c.next_scanline));
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  std::vector<uint8_t> out(buf, buf + size);
  jpeg_destroy_compress(&c);
  std::free(buf);
  return out;
}

std::vector<uint8_t> encode_png(const monet::Image& img) {
  png_image pi{};
  pi.version = PNG_IMAGE_VERSION;
  pi.width = png_uint_32(img.width);
  pi.height = png_uint_32(img.height);
  pi.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  EXPECT_TRUE(png_image_write_to_memory(&pi, nullptr, &size, 0, img.rgb.data(), 0, nullptr));
  std::vector<uint8_t> out(size);
  EXPECT_TRUE(png_image_write_to_memory(&pi, out.data(), &size, 0, img.rgb.data(), 0, nullptr));
  out.resize(size);
  return out;
}

std::vector<uint8_t> encode_webp(const monet::Image& img, bool lossless) {
  uint8_t* buf = nullptr;
  const int stride = int(img.width * 3);
  const size_t size = lossless ? WebPEncodeLosslessRGB(img.rgb.data(), int(img.width), int(img.height), stride, &buf)
                               : WebPEncodeRGB(img.rgb.data(), int(img.width), int(img.height), stride, 80, &buf);
  std::vector<uint8_t> out(buf, buf + size);
  WebPFree(buf);
  return out;
}

monet::Image decode(const std::vector<uint8_t>& bytes, const monet::ImageLimits& lim = {}) {
  return monet::decode_image(bytes.data(), bytes.size(), "test-image", lim);
}

TEST(Image, LosslessRoundTrips) {
  const monet::Image img = test_pattern(37, 23);
  for (const auto& bytes : {encode_png(img), encode_webp(img, true)}) {
    const monet::Image back = decode(bytes);
    EXPECT_EQ(back.width, 37);
    EXPECT_EQ(back.height, 23);
    EXPECT_EQ(back.rgb, img.rgb);
  }
  const monet::Image jpg = decode(encode_jpeg(img, false));
  EXPECT_EQ(jpg.width, 37);
  EXPECT_EQ(jpg.height, 23);
}

TEST(Image, ProgressiveScanLimit) {
  const auto bytes = encode_jpeg(test_pattern(64, 48), true);  // jpeg_simple_progression: 10 scans
  EXPECT_EQ(decode(bytes).width, 64);
  monet::ImageLimits lim;
  lim.max_jpeg_scans = 3;
  try {
    decode(bytes, lim);
    FAIL() << "a JPEG with more scans than the limit was decoded";
  } catch (const monet::Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("test-image"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("more than 3 scans"));
  }
}

TEST(Image, PixelLimitIsCheckedBeforeDecoding) {
  const monet::Image img = test_pattern(40, 30);
  monet::ImageLimits lim;
  lim.max_pixels = 40 * 30 - 1;
  for (const auto& bytes : {encode_jpeg(img, false), encode_png(img), encode_webp(img, false)}) {
    EXPECT_THROW(decode(bytes, lim), monet::Error);
    lim.max_pixels = 40 * 30;
    EXPECT_EQ(decode(bytes, lim).width, 40);
    lim.max_pixels = 40 * 30 - 1;
  }
  lim = {};
  lim.max_file_bytes = 10;
  EXPECT_THROW(decode(encode_png(img), lim), monet::Error);
}

// Every prefix of a valid file is refused with monet::Error (never a crash,
// never a partly grey image), and random byte flips give an image or an Error.
TEST(Image, TruncationsAndCorruptionsNeverCrash) {
  const monet::Image img = test_pattern(48, 40);
  const std::vector<std::vector<uint8_t>> files = {encode_jpeg(img, false), encode_jpeg(img, true), encode_png(img),
                                                   encode_webp(img, false), encode_webp(img, true)};
  std::mt19937 rng(7);
  for (const auto& f : files) {
    const size_t step = std::max<size_t>(1, f.size() / 300);
    for (size_t n = 0; n < f.size(); n += step) {
      std::vector<uint8_t> cut(f.begin(), f.begin() + std::ptrdiff_t(n));
      EXPECT_THROW(decode(cut), monet::Error) << "prefix of " << n << " of " << f.size() << " bytes decoded";
    }
    for (int trial = 0; trial < 300; trial++) {
      std::vector<uint8_t> bad = f;
      for (int k = 0; k < 1 + trial % 4; k++) bad[rng() % bad.size()] ^= uint8_t(1 + rng() % 255);
      try {
        const monet::Image out = decode(bad);
        EXPECT_EQ(out.rgb.size(), size_t(out.width * out.height * 3));
      } catch (const monet::Error&) {
      }
    }
  }
}

TEST(Resize, ConstantStaysConstantAndSameSizeIsACopy) {
  monet::Image flat;
  flat.width = 300;
  flat.height = 170;
  flat.rgb.assign(size_t(300 * 170 * 3), 0);
  for (size_t i = 0; i < flat.rgb.size(); i += 3) {
    flat.rgb[i] = 10;
    flat.rgb[i + 1] = 128;
    flat.rgb[i + 2] = 250;
  }
  for (auto [w, h] : {std::pair{224, 224}, {31, 7}, {600, 400}, {300, 50}, {1, 1}}) {
    const monet::Image r = monet::resize_bicubic(flat, w, h);
    ASSERT_EQ(r.width, w);
    ASSERT_EQ(r.height, h);
    for (size_t i = 0; i < r.rgb.size(); i += 3) {
      ASSERT_EQ(r.rgb[i], 10);
      ASSERT_EQ(r.rgb[i + 1], 128);
      ASSERT_EQ(r.rgb[i + 2], 250);
    }
  }
  const monet::Image img = test_pattern(33, 21);
  EXPECT_EQ(monet::resize_bicubic(img, 33, 21).rgb, img.rgb);
}

TEST(Preprocess, PadsWithTheMeanColourAndNormalises) {
  monet::Image img = test_pattern(224, 112);  // pads to 224x224: rows 0..55 and 168..223 are the fill
  const std::vector<float> px = monet::clip_preprocess(img, {});
  ASSERT_EQ(px.size(), size_t(3 * 224 * 224));
  const monet::ClipPreprocess p;
  for (int c = 0; c < 3; c++) {
    const float fill = float(int(p.mean[size_t(c)] * 255));
    const float want = (float(double(fill) / 255.0) - float(p.mean[size_t(c)])) / float(p.std[size_t(c)]);
    EXPECT_EQ(px[size_t(c * 224 * 224 + 0)], want);
    EXPECT_EQ(px[size_t(c * 224 * 224 + 223 * 224 + 100)], want);
  }
  monet::ClipPreprocess bad;
  bad.crop_height = 300;
  EXPECT_THROW(monet::clip_preprocess(img, bad), monet::Error);
}

// What the viewer draws: the RGB the tower sees, which clip_preprocess normalises.
TEST(Preprocess, RgbIsWhatGetsNormalised) {
  const monet::Image img = test_pattern(224, 112);
  const monet::ClipPreprocess p;
  const monet::Image seen = monet::clip_preprocess_rgb(img, p);
  ASSERT_EQ(seen.width, 224);
  ASSERT_EQ(seen.height, 224);
  for (int c = 0; c < 3; c++) EXPECT_EQ(seen.pixel(100, 0)[c], uint8_t(int(p.mean[size_t(c)] * 255)));  // the fill
  EXPECT_EQ(std::vector<uint8_t>(seen.pixel(0, 56), seen.pixel(0, 168)), img.rgb);  // the image, centred
  const std::vector<float> px = monet::clip_preprocess(img, p);
  for (int c = 0; c < 3; c++)
    for (int64_t k = 0; k < 224 * 224; k += 37) {
      const float v = float(double(seen.rgb[size_t(k * 3 + c)]) * p.rescale);
      EXPECT_EQ(px[size_t(c * 224 * 224 + k)], (v - float(p.mean[size_t(c)])) / float(p.std[size_t(c)]));
    }
}

TEST(Prompt, ImagesGoFirstUnlessPlaced) {
  EXPECT_EQ(monet::with_image_placeholders("what is this", 1), "<image>\nwhat is this");
  EXPECT_EQ(monet::with_image_placeholders("a", 2), "<image>\n<image>\na");
  EXPECT_EQ(monet::with_image_placeholders("look: <image> here", 1), "look: <image> here");
  EXPECT_EQ(monet::with_image_placeholders("text", 0), "text");
}

}  // namespace
