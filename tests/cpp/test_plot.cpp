// monet::plot_loss / read_loss_log: train.csv parsing, its errors, and the PNG.
#include <cairo.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "monet/error.h"
#include "monet/plot.h"
#include "temp_dir.h"

namespace {

using monet_test::TempDir;
using monet_test::write_bytes;

const char* kHeader =
    "step,tokens,lr,loss,loss_lm,loss_unif,loss_amb,grad_norm,val_loss,tokens_per_s,elapsed_s\n";

// A train.csv of `steps` rows: loss_lm decays from ~10 to ~3, val every 10 steps.
std::string make_csv(int steps, double scale = 1.0) {
  std::string s = kHeader;
  char row[256];
  for (int i = 1; i <= steps; ++i) {
    const double lm = scale * (3.0 + 7.0 * std::exp(-i / 15.0) + 0.1 * std::sin(i * 1.7));
    std::string val;
    if (i % 10 == 0) {
      char v[32];
      std::snprintf(v, sizeof v, "%.4f", scale * (3.2 + 7.0 * std::exp(-i / 15.0)));
      val = v;
    }
    std::snprintf(row, sizeof row, "%d,%d,0.0003,%.5f,%.5f,5.1,0.3,0.9,%s,1000.0,%.2f\n", i, i * 512, lm + 0.005,
                  lm, val.c_str(), i * 0.5);
    s += row;
  }
  return s;
}

// Throws `fn`'s monet::Error and returns its message.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const monet::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no monet::Error thrown";
  return "";
}

struct Png {
  std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)> surface{nullptr, cairo_surface_destroy};
  int width() const { return cairo_image_surface_get_width(surface.get()); }
  int height() const { return cairo_image_surface_get_height(surface.get()); }
  // Pixels in [x0, x1) x [y0, y1) within `tol` of colour c on every channel.
  int count(std::array<uint8_t, 3> c, int x0, int y0, int x1, int y1, int tol = 24) const {
    cairo_surface_flush(surface.get());
    const unsigned char* data = cairo_image_surface_get_data(surface.get());
    const int stride = cairo_image_surface_get_stride(surface.get());
    int n = 0;
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) {
        const uint32_t px = *reinterpret_cast<const uint32_t*>(data + size_t(y) * stride + size_t(x) * 4);
        const int r = (px >> 16) & 255, g = (px >> 8) & 255, b = px & 255;
        n += std::abs(r - c[0]) <= tol && std::abs(g - c[1]) <= tol && std::abs(b - c[2]) <= tol;
      }
    return n;
  }
};

Png load_png(const std::string& path) {
  Png p;
  p.surface.reset(cairo_image_surface_create_from_png(path.c_str()));
  EXPECT_EQ(cairo_surface_status(p.surface.get()), CAIRO_STATUS_SUCCESS) << path;
  return p;
}

TEST(PlotLoss, ReadsTrainCsv) {
  TempDir dir;
  write_bytes(dir.file("train.csv"), make_csv(25));
  const monet::LossLog log = monet::read_loss_log(dir.file("train.csv"));
  ASSERT_EQ(log.step.size(), 25u);
  EXPECT_EQ(log.step.front(), 1);
  EXPECT_EQ(log.step.back(), 25);
  ASSERT_EQ(log.val_step.size(), 2u);
  EXPECT_EQ(log.val_step[0], 10);
  EXPECT_EQ(log.val_step[1], 20);
  EXPECT_NEAR(log.loss_lm[0], 3.0 + 7.0 * std::exp(-1 / 15.0) + 0.1 * std::sin(1.7), 1e-4);
}

TEST(PlotLoss, ColumnsByNameCrlfAndResumedRuns) {
  TempDir dir;
  // Other column order, CRLF line ends, a nan loss, and a resumed run that
  // repeats steps 3-4: the later rows replace the earlier ones.
  write_bytes(dir.file("train.csv"),
              "val_loss,loss_lm,step\r\n,5.0,1\r\n4.5,4.0,2\r\n,nan,3\r\n,3.5,4\r\n,3.4,3\r\n2.9,3.3,4\r\n\r\n");
  const monet::LossLog log = monet::read_loss_log(dir.file("train.csv"));
  ASSERT_EQ(log.step.size(), 4u);
  EXPECT_EQ(log.step[2], 3);
  EXPECT_DOUBLE_EQ(log.loss_lm[2], 3.4);
  EXPECT_DOUBLE_EQ(log.loss_lm[3], 3.3);
  ASSERT_EQ(log.val_step.size(), 2u);
  EXPECT_DOUBLE_EQ(log.val_loss[1], 2.9);
}

TEST(PlotLoss, RendersPngWithCurves) {
  TempDir dir;
  std::filesystem::create_directories(dir.path() / "run1");
  const std::string csv = (dir.path() / "run1" / "train.csv").string();
  write_bytes(csv, make_csv(60));
  monet::PlotOptions opt;
  opt.out_path = dir.file("loss.png");
  opt.width = 800;
  opt.height = 500;
  monet::plot_loss({csv}, opt);
  ASSERT_TRUE(std::filesystem::exists(opt.out_path));
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))  // no temp file left
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << e.path();

  const Png png = load_png(opt.out_path);
  ASSERT_EQ(png.width(), 800);
  ASSERT_EQ(png.height(), 500);
  // The train curve starts high at the left: its colour in the left half of
  // the plot area (the legend is at the top right).
  const int train_left = png.count(monet::plot_train_color(0), 80, 40, 400, 440);
  EXPECT_GT(train_left, 100);
  EXPECT_GT(png.count(monet::plot_val_color(0), 80, 40, 780, 440), 50);
  // Margins hold text, not curves; corners are white.
  EXPECT_EQ(png.count(monet::plot_train_color(0), 0, 0, 800, 10), 0);
  EXPECT_EQ(png.count({255, 255, 255}, 0, 0, 10, 10, 0), 100);
  // Text (dark pixels) drawn: title, tick labels.
  EXPECT_GT(png.count({38, 38, 38}, 0, 0, 800, 40, 60), 50);
  EXPECT_GT(png.count({38, 38, 38}, 0, 440, 800, 500, 60), 50);
}

TEST(PlotLoss, SeveralLogsSmoothingAndLogScale) {
  TempDir dir;
  std::vector<std::string> csvs;
  for (const char* run : {"a", "b"}) {
    std::filesystem::create_directories(dir.path() / run);
    csvs.push_back((dir.path() / run / "train.csv").string());
    write_bytes(csvs.back(), make_csv(50, run[0] == 'a' ? 1.0 : 1.5));
  }
  monet::PlotOptions opt;
  opt.out_path = dir.file("loss.png");
  opt.log_y = true;
  opt.smooth = 0.9;
  opt.title = "two runs";
  monet::plot_loss(csvs, opt);
  const Png png = load_png(opt.out_path);
  ASSERT_EQ(png.width(), 1000);
  ASSERT_EQ(png.height(), 600);
  EXPECT_GT(png.count(monet::plot_train_color(0), 90, 50, 500, 530), 100);
  EXPECT_GT(png.count(monet::plot_train_color(1), 90, 50, 500, 530), 100);
  EXPECT_NE(monet::plot_train_color(0), monet::plot_train_color(1));
  EXPECT_NE(monet::plot_train_color(1), monet::plot_val_color(1));
  EXPECT_NE(monet::plot_val_color(0), monet::plot_val_color(1));
}

TEST(PlotLoss, LabelsAreParentDirectories) {
  EXPECT_EQ(monet::plot_labels({"/x/run1/train.csv", "/x/run2/train.csv"}),
            (std::vector<std::string>{"run1", "run2"}));
  EXPECT_EQ(monet::plot_labels({"/x/a/out/train.csv", "/x/b/out/train.csv", "/y/c/train.csv"}),
            (std::vector<std::string>{"a/out", "b/out", "c"}));
  EXPECT_EQ(monet::plot_labels({"/x/r/train.csv", "/x/r/train.csv"}),
            (std::vector<std::string>{"r", "r #2"}));
}

TEST(PlotLoss, BadCsvErrorsNameFileAndLine) {
  TempDir dir;
  const std::string f = dir.file("train.csv");
  const auto read = [&] { monet::read_loss_log(f); };

  std::string msg = error_of([&] { monet::read_loss_log(dir.file("missing.csv")); });
  EXPECT_NE(msg.find("missing.csv"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no such file"), std::string::npos) << msg;

  write_bytes(f, "step,tokens,loss\n1,512,3.0\n");
  msg = error_of(read);
  EXPECT_NE(msg.find(f + ":1:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("loss_lm, val_loss"), std::string::npos) << msg;

  write_bytes(f, std::string(kHeader) + "1,512,0.001,3.0,2.9,5,0.3,1.0,,100,1\n2,1024,0.001,3.0,abc,5,0.3,1.0,,100,2\n");
  msg = error_of(read);
  EXPECT_NE(msg.find(f + ":3:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("loss_lm"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"abc\" is not a number"), std::string::npos) << msg;

  write_bytes(f, std::string(kHeader) + "1,512,0.001,3.0,2.9,5,0.3,1.0,x2.5,100,1\n");
  msg = error_of(read);
  EXPECT_NE(msg.find(f + ":2: column val_loss"), std::string::npos) << msg;

  write_bytes(f, std::string(kHeader) + "1,512,0.001,3.0\n");
  msg = error_of(read);
  EXPECT_NE(msg.find(f + ":2: expected 11"), std::string::npos) << msg;

  write_bytes(f, kHeader);
  msg = error_of(read);
  EXPECT_NE(msg.find("no data rows"), std::string::npos) << msg;

  write_bytes(f, "");
  msg = error_of(read);
  EXPECT_NE(msg.find("empty file"), std::string::npos) << msg;
}

TEST(PlotLoss, BadInputWritesNothing) {
  TempDir dir;
  const std::string good = dir.file("good.csv"), bad = dir.file("bad.csv");
  write_bytes(good, make_csv(5));
  write_bytes(bad, std::string(kHeader) + "1,512,0.001,3.0,oops,5,0.3,1.0,,100,1\n");
  monet::PlotOptions opt;
  opt.out_path = dir.file("loss.png");
  const std::string msg = error_of([&] { monet::plot_loss({good, bad}, opt); });
  EXPECT_NE(msg.find("bad.csv:2:"), std::string::npos) << msg;
  EXPECT_FALSE(std::filesystem::exists(opt.out_path));

  opt.smooth = 1.0;
  EXPECT_NE(error_of([&] { monet::plot_loss({good}, opt); }).find("--smooth"), std::string::npos);
  opt.smooth = 0;
  opt.width = 10;
  EXPECT_NE(error_of([&] { monet::plot_loss({good}, opt); }).find("out of range"), std::string::npos);
  opt.width = 1000;
  opt.out_path = dir.file("no/such/dir/loss.png");
  EXPECT_NE(error_of([&] { monet::plot_loss({good}, opt); }).find("cannot create"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(opt.out_path));

  // All losses nan: nothing to plot.
  write_bytes(bad, std::string(kHeader) + "1,512,0.001,nan,nan,5,0.3,1.0,,100,1\n");
  opt.out_path = dir.file("loss.png");
  EXPECT_NE(error_of([&] { monet::plot_loss({bad}, opt); }).find("nothing to plot"), std::string::npos);
}

}  // namespace
