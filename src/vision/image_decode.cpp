// JPEG (libjpeg-turbo), PNG (libpng) and WebP (libwebp) decoding into RGB8.
//
// libjpeg and libpng report errors by longjmp. Each decoder keeps its C
// state in a heap-allocated struct whose destructor releases it, calls
// setjmp in the function that owns it, and lets only C frames (the
// libraries and the callbacks below, none of which own C++ objects) lie
// between the setjmp and the longjmp.
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <webp/decode.h>

#include "monet/error.h"
#include "monet/image.h"
#include "monet/safetensors.h"

namespace monet {

const char* image_format_name(ImageFormat f) {
  switch (f) {
    case ImageFormat::Jpeg: return "JPEG";
    case ImageFormat::Png: return "PNG";
    case ImageFormat::Webp: return "WebP";
    default: return "unknown";
  }
}

ImageFormat sniff_image_format(const uint8_t* d, size_t n) {
  if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return ImageFormat::Jpeg;
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (n >= 8 && std::memcmp(d, png_sig, 8) == 0) return ImageFormat::Png;
  if (n >= 12 && std::memcmp(d, "RIFF", 4) == 0 && std::memcmp(d + 8, "WEBP", 4) == 0) return ImageFormat::Webp;
  return ImageFormat::Unknown;
}

namespace {

// A name for formats we recognise but do not decode, for the error message.
std::string other_format_name(const uint8_t* d, size_t n) {
  if (n >= 6 && (std::memcmp(d, "GIF87a", 6) == 0 || std::memcmp(d, "GIF89a", 6) == 0)) return "GIF";
  if (n >= 2 && d[0] == 'B' && d[1] == 'M') return "BMP";
  if (n >= 4 && (std::memcmp(d, "II*\0", 4) == 0 || std::memcmp(d, "MM\0*", 4) == 0)) return "TIFF";
  if (n >= 12 && std::memcmp(d + 4, "ftyp", 4) == 0) return "HEIF/AVIF";
  if (n >= 4 && std::memcmp(d, "\0\0\1\0", 4) == 0) return "ICO";
  if (n >= 5 && (std::memcmp(d, "<?xml", 5) == 0 || std::memcmp(d, "<svg", 4) == 0)) return "SVG";
  return "";
}

void check_dimensions(const std::string& name, const char* format, int64_t w, int64_t h, const ImageLimits& lim) {
  if (w <= 0 || h <= 0) fail(name, ": ", format, " image has empty dimensions ", w, "x", h);
  if (w > lim.max_pixels / h)
    fail(name, ": ", format, " image of ", w, "x", h, " pixels is over the limit of ", lim.max_pixels,
         " pixels (a decompression bomb?)");
}

// ---------------------------------------------------------------- JPEG ----

struct JpegState {
  jpeg_decompress_struct cinfo;
  jpeg_error_mgr err;
  jpeg_progress_mgr progress;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX] = {0};
  bool created = false;
  int max_scans = 0;
  ~JpegState() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

JpegState* jpeg_state(j_common_ptr cinfo) {
  return static_cast<JpegState*>(cinfo->client_data);
}

[[noreturn]] void jpeg_on_error(j_common_ptr cinfo) {
  JpegState* st = jpeg_state(cinfo);
  (*cinfo->err->format_message)(cinfo, st->message);
  std::longjmp(st->jump, 1);
}

void jpeg_on_message(j_common_ptr cinfo, int level) {
  // Warnings about corrupt data are tolerated as PIL tolerates them, except
  // the end of the data: jpeg_mem_src then pads with a fake EOI and the rest
  // of the image would be grey. That is a truncated file.
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    JpegState* st = jpeg_state(cinfo);
    std::snprintf(st->message, sizeof st->message, "file is truncated (premature end of JPEG data)");
    std::longjmp(st->jump, 1);
  }
}

void jpeg_on_output(j_common_ptr) {}  // the library never prints

void jpeg_on_progress(j_common_ptr cinfo) {
  JpegState* st = jpeg_state(cinfo);
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number > st->max_scans) {
    std::snprintf(st->message, sizeof st->message, "progressive JPEG with more than %d scans (a decoding bomb)",
                  st->max_scans);
    std::longjmp(st->jump, 1);
  }
}

Image decode_jpeg(const uint8_t* data, size_t n, const std::string& name, const ImageLimits& lim) {
  auto st = std::make_unique<JpegState>();
  // Every C++ object of this frame exists before setjmp: a longjmp back
  // here must not skip a destructor.
  Image img;
  std::vector<uint8_t> row;
  bool cmyk = false;
  if (setjmp(st->jump)) fail(name, ": bad JPEG: ", st->message);

  st->cinfo.err = jpeg_std_error(&st->err);
  st->cinfo.client_data = st.get();
  st->err.error_exit = jpeg_on_error;
  st->err.emit_message = jpeg_on_message;
  st->err.output_message = jpeg_on_output;
  st->max_scans = lim.max_jpeg_scans;
  jpeg_create_decompress(&st->cinfo);
  st->created = true;
  st->progress.progress_monitor = jpeg_on_progress;
  st->cinfo.progress = &st->progress;
  jpeg_mem_src(&st->cinfo, data, static_cast<unsigned long>(n));
  jpeg_read_header(&st->cinfo, TRUE);
  check_dimensions(name, "JPEG", st->cinfo.image_width, st->cinfo.image_height, lim);

  // PIL's modes: grey and YCbCr/RGB become RGB; CMYK and YCCK are read as
  // (inverted, Adobe) CMYK and converted below as PIL's cmyk2rgb does.
  const J_COLOR_SPACE cs = st->cinfo.jpeg_color_space;
  if (cs == JCS_CMYK || cs == JCS_YCCK) {
    st->cinfo.out_color_space = JCS_CMYK;
    cmyk = true;
  } else if (cs == JCS_GRAYSCALE || cs == JCS_YCbCr || cs == JCS_RGB) {
    st->cinfo.out_color_space = JCS_RGB;
  } else {
    std::snprintf(st->message, sizeof st->message, "unsupported JPEG colour space %d", int(cs));
    std::longjmp(st->jump, 1);
  }
  jpeg_start_decompress(&st->cinfo);
  const int64_t w = st->cinfo.output_width, h = st->cinfo.output_height;
  const int comps = st->cinfo.output_components;  // 3 or 4 (checked by the settings above)
  img.width = w;
  img.height = h;
  img.rgb.resize(size_t(w * h * 3));
  row.resize(size_t(w * comps));
  while (st->cinfo.output_scanline < st->cinfo.output_height) {
    const int64_t y = st->cinfo.output_scanline;
    JSAMPROW rows[1] = {cmyk ? row.data() : img.rgb.data() + size_t(y * w * 3)};
    jpeg_read_scanlines(&st->cinfo, rows, 1);
    if (cmyk) {
      uint8_t* out = img.rgb.data() + size_t(y * w * 3);
      for (int64_t x = 0; x < w; x++) {
        // PIL: "CMYK;I" unpacks inverted samples, then r = nk - nk*c/255 (rounded as MULDIV255).
        const uint8_t* px = row.data() + x * 4;
        const int nk = px[3];  // 255 - (255 - k)
        for (int c = 0; c < 3; c++) {
          const int ci = 255 - px[c];
          const int t = ci * nk + 128;
          const int v = nk - (((t >> 8) + t) >> 8);
          out[x * 3 + c] = uint8_t(v < 0 ? 0 : v);
        }
      }
    }
  }
  jpeg_finish_decompress(&st->cinfo);
  return img;
}

// ----------------------------------------------------------------- PNG ----

struct PngState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  const uint8_t* data = nullptr;
  size_t size = 0, pos = 0;
  char message[256] = {0};
  ~PngState() {
    if (png) png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
  }
};

[[noreturn]] void png_on_error(png_structp png, png_const_charp msg) {
  auto* st = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(st->message, sizeof st->message, "%s", msg);
  png_longjmp(png, 1);
}

void png_on_warning(png_structp, png_const_charp) {}  // the library never prints

void png_on_read(png_structp png, png_bytep out, png_size_t len) {
  auto* st = static_cast<PngState*>(png_get_io_ptr(png));
  if (len > st->size - st->pos) png_error(png, "file is truncated (premature end of PNG data)");
  std::memcpy(out, st->data + st->pos, len);
  st->pos += len;
}

Image decode_png(const uint8_t* data, size_t n, const std::string& name, const ImageLimits& lim) {
  auto st = std::make_unique<PngState>();
  st->data = data;
  st->size = n;
  // As for JPEG: all C++ objects of this frame exist before setjmp.
  Image img;
  std::vector<png_bytep> rows;
  std::vector<uint8_t> pixels;
  st->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, st.get(), png_on_error, png_on_warning);
  if (!st->png) fail(name, ": cannot create a PNG reader");
  st->info = png_create_info_struct(st->png);
  if (!st->info) fail(name, ": cannot create a PNG reader");
  if (setjmp(png_jmpbuf(st->png))) fail(name, ": bad PNG: ", st->message);

  png_set_read_fn(st->png, st.get(), png_on_read);
  // Ancillary chunks (text, ICC profiles) are capped too: a compressed
  // chunk may not inflate past 8 MiB, and no more than 1000 of them.
  png_set_chunk_malloc_max(st->png, 8u << 20);
  png_set_chunk_cache_max(st->png, 1000);
  png_read_info(st->png, st->info);
  const int64_t w = png_get_image_width(st->png, st->info), h = png_get_image_height(st->png, st->info);
  check_dimensions(name, "PNG", w, h, lim);

  const int color = png_get_color_type(st->png, st->info);
  const int depth = png_get_bit_depth(st->png, st->info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(st->png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(st->png);
  if (depth == 16) png_set_strip_16(st->png);  // the high byte, as PIL's "RGB;16B" rawmodes
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(st->png);
  png_set_interlace_handling(st->png);
  png_read_update_info(st->png, st->info);
  const int channels = png_get_channels(st->png, st->info);  // 3, or 4 with alpha (dropped below)
  if ((channels != 3 && channels != 4) || png_get_rowbytes(st->png, st->info) != size_t(w * channels)) {
    std::snprintf(st->message, sizeof st->message, "unexpected layout after conversion (%d channels)", channels);
    png_longjmp(st->png, 1);
  }
  pixels.resize(size_t(w * h * channels));
  rows.resize(size_t(h));
  for (int64_t y = 0; y < h; y++) rows[size_t(y)] = pixels.data() + size_t(y * w * channels);
  png_read_image(st->png, rows.data());
  png_read_end(st->png, nullptr);

  img.width = w;
  img.height = h;
  if (channels == 3) {
    img.rgb = std::move(pixels);
  } else {
    img.rgb.resize(size_t(w * h * 3));
    for (size_t i = 0, count = size_t(w * h); i < count; i++) std::memcpy(&img.rgb[i * 3], &pixels[i * 4], 3);
  }
  return img;
}

// ---------------------------------------------------------------- WebP ----

const char* webp_status(VP8StatusCode s) {
  switch (s) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "corrupt bitstream";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED: return "suspended";
    case VP8_STATUS_USER_ABORT: return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "file is truncated (not enough data)";
    default: return "error";
  }
}

Image decode_webp(const uint8_t* data, size_t n, const std::string& name, const ImageLimits& lim) {
  WebPDecoderConfig config;
  if (!WebPInitDecoderConfig(&config)) fail(name, ": libwebp version mismatch");
  VP8StatusCode status = WebPGetFeatures(data, n, &config.input);
  if (status != VP8_STATUS_OK) fail(name, ": bad WebP: ", webp_status(status));
  if (config.input.has_animation) fail(name, ": animated WebP is not supported (decode one frame to PNG first)");
  check_dimensions(name, "WebP", config.input.width, config.input.height, lim);
  Image img;
  img.width = config.input.width;
  img.height = config.input.height;
  img.rgb.resize(size_t(img.width * img.height * 3));
  // Straight (not premultiplied) RGB with libwebp's default fancy upsampling,
  // as PIL's RGBA decode gives before alpha is dropped.
  config.output.colorspace = MODE_RGB;
  config.output.is_external_memory = 1;
  config.output.u.RGBA.rgba = img.rgb.data();
  config.output.u.RGBA.stride = int(img.width * 3);
  config.output.u.RGBA.size = img.rgb.size();
  status = WebPDecode(data, n, &config);
  WebPFreeDecBuffer(&config.output);
  if (status != VP8_STATUS_OK) fail(name, ": bad WebP: ", webp_status(status));
  return img;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t n, const std::string& name, const ImageLimits& limits) {
  if (n == 0) fail(name, ": empty file, expected a JPEG, PNG or WebP image");
  if (n > limits.max_file_bytes)
    fail(name, ": ", n, " bytes is over the image file limit of ", limits.max_file_bytes, " bytes");
  switch (sniff_image_format(data, n)) {
    case ImageFormat::Jpeg: return decode_jpeg(data, n, name, limits);
    case ImageFormat::Png: return decode_png(data, n, name, limits);
    case ImageFormat::Webp: return decode_webp(data, n, name, limits);
    default: break;
  }
  const std::string other = other_format_name(data, n);
  if (!other.empty()) fail(name, ": ", other, " images are not supported; expected JPEG, PNG or WebP");
  fail(name, ": not a JPEG, PNG or WebP image (unrecognised signature)");
}

Image decode_image_file(const std::string& path, const ImageLimits& limits) {
  const std::string bytes = read_file(path);
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path, limits);
}

}  // namespace monet
