// monet::plot_loss — training curves from train.csv files, drawn with Cairo.
#include "monet/plot.h"

#include <cairo.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <numbers>
#include <string_view>

#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {
namespace {

constexpr const char* kExpectedHeader =
    "step,tokens,lr,loss,loss_lm,loss_unif,loss_amb,grad_norm,val_loss,tokens_per_s,elapsed_s";

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split_fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    const size_t comma = line.find(',', start);
    out.push_back(trim(line.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start)));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

// A whole field as a double ("nan" and "inf" included); false if it is not one.
bool parse_number(std::string_view s, double& v) {
  if (s.empty()) return false;
  if (s.front() == '+') s.remove_prefix(1);
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

std::string quoted(std::string_view s) {
  constexpr size_t kMax = 40;
  std::string t(s.substr(0, kMax));
  if (s.size() > kMax) t += "...";
  return "\"" + t + "\"";
}

// ---- drawing ---------------------------------------------------------------

struct Rgb {
  double r, g, b;
};

// Tableau 10: log i gets the pair (2i, 2i+1), shifted by one every 5 logs.
constexpr uint8_t kPalette[10][3] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},
                                     {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                                     {188, 189, 34}, {23, 190, 207}};

std::array<uint8_t, 3> palette(size_t k) {
  const uint8_t* c = kPalette[k % 10];
  return {c[0], c[1], c[2]};
}

Rgb to_rgb(std::array<uint8_t, 3> c) { return {c[0] / 255.0, c[1] / 255.0, c[2] / 255.0}; }

struct SurfaceDeleter {
  void operator()(cairo_surface_t* s) const { cairo_surface_destroy(s); }
};
struct ContextDeleter {
  void operator()(cairo_t* c) const { cairo_destroy(c); }
};

// A value axis: data range [lo, hi] (log10 units when log) and its ticks.
struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  std::vector<double> ticks;        // in data units (not log10)
  std::vector<std::string> labels;
  double map(double v, double p0, double p1) const {  // data value -> pixel
    const double t = log ? std::log10(v) : v;
    return p0 + (t - lo) / (hi - lo) * (p1 - p0);
  }
};

double nice_step(double range, double target) {
  const double raw = range / std::max(target, 1.0);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

std::string format_fixed(double v, int decimals) {
  char buf[64];
  if (std::fabs(v) < 1e-12) v = 0;  // no "-0.0"
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

int decimals_for(double step) { return std::max(0, -int(std::floor(std::log10(step) + 1e-9))); }

void linear_ticks(Axis& a, double lo, double hi, double target, double min_step) {
  const double step = std::max(nice_step(hi - lo, target), min_step);
  const int dec = decimals_for(step);
  for (long long k = (long long)std::ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; ++k) {
    const double v = k * step;
    if (a.log && v <= 0) continue;
    a.ticks.push_back(v);
    a.labels.push_back(format_fixed(v, dec));
  }
}

void log_ticks(Axis& a, double target) {
  const int max_ticks = std::max(2, int(target) + 2);
  for (const std::vector<int>& mults : {std::vector<int>{1, 2, 5}, std::vector<int>{1}}) {
    a.ticks.clear();
    a.labels.clear();
    for (int d = int(std::floor(a.lo)); d <= int(std::ceil(a.hi)); ++d)
      for (int m : mults) {
        const double t = std::log10(double(m)) + d;
        if (t < a.lo - 1e-9 || t > a.hi + 1e-9) continue;
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", m * std::pow(10.0, d));
        a.ticks.push_back(m * std::pow(10.0, d));
        a.labels.push_back(buf);
      }
    if (int(a.ticks.size()) <= max_ticks) break;
  }
  if (a.ticks.size() > size_t(max_ticks)) {  // many decades: every k-th one
    const size_t every = (a.ticks.size() + max_ticks - 1) / max_ticks;
    std::vector<double> t;
    std::vector<std::string> l;
    for (size_t i = 0; i < a.ticks.size(); i += every) t.push_back(a.ticks[i]), l.push_back(a.labels[i]);
    a.ticks = std::move(t);
    a.labels = std::move(l);
  }
  if (a.ticks.size() < 3) {  // less than a decade: plain ticks at log positions
    a.ticks.clear();
    a.labels.clear();
    linear_ticks(a, std::pow(10.0, a.lo), std::pow(10.0, a.hi), target, 0);
  }
}

class Painter {
 public:
  explicit Painter(cairo_t* cr) : cr_(cr) {}
  void color(Rgb c, double alpha = 1) { cairo_set_source_rgba(cr_, c.r, c.g, c.b, alpha); }
  void font(double size, bool bold = false) {
    cairo_select_font_face(cr_, "sans-serif", CAIRO_FONT_SLANT_NORMAL,
                           bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr_, size);
  }
  double text_width(const std::string& s) {
    cairo_text_extents_t e;
    cairo_text_extents(cr_, s.c_str(), &e);
    return e.x_advance;
  }
  double line_height() {
    cairo_font_extents_t f;
    cairo_font_extents(cr_, &f);
    return f.ascent + f.descent;
  }
  // Text anchored at (x, y): halign 0 left, 0.5 centre, 1 right; y is the
  // vertical centre of the line.
  void text(const std::string& s, double x, double y, double halign) {
    cairo_font_extents_t f;
    cairo_font_extents(cr_, &f);
    cairo_move_to(cr_, x - halign * text_width(s), y + (f.ascent - f.descent) / 2);
    cairo_show_text(cr_, s.c_str());
  }
  void line(double x0, double y0, double x1, double y1, double width) {
    cairo_set_line_width(cr_, width);
    cairo_move_to(cr_, x0, y0);
    cairo_line_to(cr_, x1, y1);
    cairo_stroke(cr_);
  }
  cairo_t* cr() const { return cr_; }

 private:
  cairo_t* cr_;
};

// Pixel-aligned coordinate for a 1-pixel line.
double crisp(double v) { return std::floor(v) + 0.5; }

cairo_status_t append_png(void* closure, const unsigned char* data, unsigned int length) {
  static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

struct Series {
  std::vector<double> x, y;
};

// Exponential moving average over the finite values, s = a*s + (1-a)*x.
Series ema(const std::vector<double>& x, const std::vector<double>& y, double a) {
  Series s;
  bool have = false;
  double acc = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(y[i])) continue;
    acc = have ? a * acc + (1 - a) * y[i] : y[i];
    have = true;
    s.x.push_back(x[i]);
    s.y.push_back(acc);
  }
  return s;
}

}  // namespace

LossLog read_loss_log(const std::string& path) {
  if (!std::filesystem::exists(path)) fail(path, ": no such file");
  const std::string text = read_file(path);
  LossLog log;
  log.path = path;
  int col_step = -1, col_lm = -1, col_val = -1;
  size_t n_fields = 0;
  bool header_seen = false;
  size_t line_no = 0, pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string_view line = trim(std::string_view(text).substr(pos, end - pos));
    pos = end + 1;
    ++line_no;
    if (line.empty()) continue;
    const std::vector<std::string_view> f = split_fields(line);
    if (!header_seen) {
      header_seen = true;
      n_fields = f.size();
      std::map<std::string_view, int> cols;
      for (size_t i = 0; i < f.size(); ++i)
        if (!cols.emplace(f[i], int(i)).second)
          fail(path, ":", line_no, ": column ", quoted(f[i]), " appears twice in the header");
      std::string missing;
      for (const char* name : {"step", "loss_lm", "val_loss"})
        if (!cols.count(name)) missing += (missing.empty() ? "" : ", ") + std::string(name);
      if (!missing.empty())
        fail(path, ":", line_no, ": not a train.csv: the header lacks column(s) ", missing, " (expected ",
             kExpectedHeader, "; found ", quoted(line), ")");
      col_step = cols["step"];
      col_lm = cols["loss_lm"];
      col_val = cols["val_loss"];
      continue;
    }
    if (f.size() != n_fields)
      fail(path, ":", line_no, ": expected ", n_fields, " comma-separated fields as in the header, found ", f.size());
    double step, lm, val = 0;
    if (!parse_number(f[col_step], step) || !std::isfinite(step))
      fail(path, ":", line_no, ": column step: ", quoted(f[col_step]), " is not a number");
    if (!parse_number(f[col_lm], lm))
      fail(path, ":", line_no, ": column loss_lm: ", quoted(f[col_lm]), " is not a number");
    const bool has_val = !f[col_val].empty();
    if (has_val && !parse_number(f[col_val], val))
      fail(path, ":", line_no, ": column val_loss: ", quoted(f[col_val]), " is not a number (nor empty)");
    // A resumed run repeats steps from its checkpoint on: the later rows win.
    while (!log.step.empty() && log.step.back() >= step) log.step.pop_back(), log.loss_lm.pop_back();
    while (!log.val_step.empty() && log.val_step.back() >= step) log.val_step.pop_back(), log.val_loss.pop_back();
    log.step.push_back(step);
    log.loss_lm.push_back(lm);
    if (has_val) {
      log.val_step.push_back(step);
      log.val_loss.push_back(val);
    }
  }
  if (!header_seen) fail(path, ": empty file (expected the header ", kExpectedHeader, ")");
  if (log.step.empty()) fail(path, ": no data rows after the header");
  return log;
}

std::array<uint8_t, 3> plot_train_color(size_t index) { return palette(2 * index + index / 5); }
std::array<uint8_t, 3> plot_val_color(size_t index) { return palette(2 * index + 1 + index / 5); }

std::vector<std::string> plot_labels(const std::vector<std::string>& csv_paths) {
  namespace fs = std::filesystem;
  const size_t n = csv_paths.size();
  std::vector<std::vector<std::string>> parts(n);  // parent directory components, last first
  for (size_t i = 0; i < n; ++i) {
    const fs::path parent = fs::absolute(fs::path(csv_paths[i])).lexically_normal().parent_path();
    for (const auto& c : parent) {
      const std::string s = c.string();
      if (!s.empty() && s != "/") parts[i].insert(parts[i].begin(), s);
    }
    if (parts[i].empty()) parts[i].push_back("/");
  }
  std::vector<size_t> depth(n, 1);
  std::vector<std::string> labels(n);
  for (int round = 0;; ++round) {
    for (size_t i = 0; i < n; ++i) {
      const size_t d = std::min(depth[i], parts[i].size());
      std::string l;
      for (size_t k = d; k-- > 0;) l += parts[i][k] + (k ? "/" : "");
      labels[i] = l;
    }
    bool grew = false;
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < n; ++j)
        if (i != j && labels[i] == labels[j] && parts[i] != parts[j] && depth[i] < parts[i].size()) {
          ++depth[i];
          grew = true;
          break;
        }
    if (!grew || round > 64) break;
  }
  for (size_t i = 0; i < n; ++i)  // still equal (the same file twice): number them
    for (size_t j = i + 1; j < n; ++j)
      if (labels[j] == labels[i]) labels[j] += " #" + std::to_string(j + 1);
  return labels;
}

void plot_loss(const std::vector<std::string>& csv_paths, const PlotOptions& o) {
  if (csv_paths.empty()) fail("plot-loss: no train.csv files given");
  if (o.out_path.empty()) fail("plot-loss: no output path given");
  if (o.width < 200 || o.width > 16384 || o.height < 150 || o.height > 16384)
    fail("plot-loss: image size ", o.width, "x", o.height, " out of range (width 200..16384, height 150..16384)");
  if (!(o.smooth >= 0 && o.smooth < 1)) fail("plot-loss: --smooth ", o.smooth, " must be in [0, 1)");

  std::vector<LossLog> logs;
  for (const auto& p : csv_paths) logs.push_back(read_loss_log(p));
  const std::vector<std::string> names = plot_labels(csv_paths);
  const bool multi = logs.size() > 1;

  const auto usable = [&](double v) { return std::isfinite(v) && (!o.log_y || v > 0); };
  std::vector<Series> smoothed(logs.size());
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  const auto take = [&](const std::vector<double>& xs, const std::vector<double>& ys) {
    for (size_t i = 0; i < xs.size(); ++i)
      if (usable(ys[i])) {
        xmin = std::min(xmin, xs[i]), xmax = std::max(xmax, xs[i]);
        ymin = std::min(ymin, ys[i]), ymax = std::max(ymax, ys[i]);
      }
  };
  for (size_t i = 0; i < logs.size(); ++i) {
    take(logs[i].step, logs[i].loss_lm);
    take(logs[i].val_step, logs[i].val_loss);
    if (o.smooth > 0) smoothed[i] = ema(logs[i].step, logs[i].loss_lm, o.smooth);
  }
  if (!(xmin <= xmax))
    fail("plot-loss: nothing to plot: no ", o.log_y ? "positive " : "", "finite loss values in ", csv_paths[0],
         multi ? " and the other files" : "");

  // ---- scales and ticks ----
  const double s = std::clamp(std::min(o.width / 1000.0, o.height / 600.0), 0.6, 4.0);
  Axis xa, ya;
  if (xmax - xmin < 1) xmin -= 1, xmax += 1;
  const double xpad = (xmax - xmin) * 0.02;
  xa.lo = xmin - xpad, xa.hi = xmax + xpad;
  ya.log = o.log_y;
  double lo = o.log_y ? std::log10(ymin) : ymin, hi = o.log_y ? std::log10(ymax) : ymax;
  if (hi - lo < 1e-12) {
    const double pad = o.log_y ? 0.1 : std::max(std::fabs(lo) * 0.05, 0.5);
    lo -= pad, hi += pad;
  } else {
    const double pad = (hi - lo) * 0.05;
    lo -= pad, hi += pad;
  }
  ya.lo = lo, ya.hi = hi;

  std::unique_ptr<cairo_surface_t, SurfaceDeleter> surface(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, o.width, o.height));
  if (cairo_surface_status(surface.get()) != CAIRO_STATUS_SUCCESS)
    fail(o.out_path, ": cannot create a ", o.width, "x", o.height,
         " image: ", cairo_status_to_string(cairo_surface_status(surface.get())));
  std::unique_ptr<cairo_t, ContextDeleter> ctx(cairo_create(surface.get()));
  Painter p(ctx.get());
  cairo_t* cr = ctx.get();

  const double title_size = 18 * s, tick_size = 12 * s, axis_title_size = 14 * s, legend_size = 12 * s;
  const double tick_len = 5 * s, gap = 6 * s;

  // Layout: margins from the text they hold.
  p.font(title_size, true);
  const double title_h = p.line_height();
  p.font(axis_title_size);
  const double axis_title_h = p.line_height();
  p.font(tick_size);
  const double tick_h = p.line_height();
  const double top = gap * 2 + title_h + gap;
  const double bottom = tick_len + gap + tick_h + gap + axis_title_h + gap * 1.5;
  const double right = 24 * s;
  const double plot_h = o.height - top - bottom;
  if (ya.log)
    log_ticks(ya, plot_h / (45 * s));
  else
    linear_ticks(ya, ya.lo, ya.hi, plot_h / (45 * s), 0);
  double ylabel_w = 0;
  for (const auto& l : ya.labels) ylabel_w = std::max(ylabel_w, p.text_width(l));
  const double left = gap * 1.5 + axis_title_h + gap + ylabel_w + gap + tick_len;
  const double X0 = left, X1 = o.width - right, Y0 = top, Y1 = o.height - bottom;
  if (X1 - X0 < 40 || Y1 - Y0 < 40) fail("plot-loss: image ", o.width, "x", o.height, " too small for the plot");
  {
    // x ticks: room for the widest label (the larger end) plus spacing.
    const std::string widest = format_fixed(std::max(std::fabs(xa.lo), std::fabs(xa.hi)), 0);
    const double per_tick = p.text_width(widest) + 40 * s;
    linear_ticks(xa, xa.lo, xa.hi, std::max(2.0, (X1 - X0) / std::max(per_tick, 80 * s)), 1);
  }
  const auto px = [&](double x) { return xa.map(x, X0, X1); };
  const auto py = [&](double y) { return ya.map(y, Y1, Y0); };

  // Background, grid, frame.
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  const Rgb grid{0.90, 0.90, 0.90}, ink{0.15, 0.15, 0.15};
  p.color(grid);
  for (double t : xa.ticks) p.line(crisp(px(t)), Y0, crisp(px(t)), Y1, 1);
  for (double t : ya.ticks) p.line(X0, crisp(py(t)), X1, crisp(py(t)), 1);

  // Curves, clipped to the plot area.
  cairo_save(cr);
  cairo_rectangle(cr, X0, Y0, X1 - X0, Y1 - Y0);
  cairo_clip(cr);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
  // Strokes the usable points as lines (gaps where the loss is nan/inf, or
  // <= 0 on a log axis); a point with no usable neighbour becomes a dot.
  const auto polyline = [&](const std::vector<double>& xs, const std::vector<double>& ys, double width) {
    const auto ok = [&](size_t i) { return i < xs.size() && usable(ys[i]); };
    cairo_set_line_width(cr, width);
    for (size_t i = 0; i < xs.size(); ++i)
      if (ok(i)) {
        if (i > 0 && ok(i - 1))
          cairo_line_to(cr, px(xs[i]), py(ys[i]));
        else
          cairo_move_to(cr, px(xs[i]), py(ys[i]));
      }
    cairo_stroke(cr);
    for (size_t i = 0; i < xs.size(); ++i)
      if (ok(i) && !(i > 0 && ok(i - 1)) && !ok(i + 1)) {
        cairo_arc(cr, px(xs[i]), py(ys[i]), std::max(width, 2.5 * s), 0, 2 * std::numbers::pi);
        cairo_fill(cr);
      }
  };
  for (size_t i = 0; i < logs.size(); ++i) {
    const Rgb c = to_rgb(plot_train_color(i));
    p.color(c, o.smooth > 0 ? 0.25 : 1.0);
    polyline(logs[i].step, logs[i].loss_lm, 1.5 * s);
    if (o.smooth > 0) {
      p.color(c);
      polyline(smoothed[i].x, smoothed[i].y, 2 * s);
    }
  }
  for (size_t i = 0; i < logs.size(); ++i) {
    p.color(to_rgb(plot_val_color(i)));
    polyline(logs[i].val_step, logs[i].val_loss, 2 * s);
    for (size_t k = 0; k < logs[i].val_step.size(); ++k) {
      if (!usable(logs[i].val_loss[k])) continue;
      cairo_arc(cr, px(logs[i].val_step[k]), py(logs[i].val_loss[k]), 3.5 * s, 0, 2 * std::numbers::pi);
      cairo_fill(cr);
    }
  }
  cairo_restore(cr);

  // Frame, ticks and tick labels.
  p.color(ink);
  cairo_set_line_width(cr, 1);
  cairo_rectangle(cr, crisp(X0), crisp(Y0), std::floor(X1) - std::floor(X0), std::floor(Y1) - std::floor(Y0));
  cairo_stroke(cr);
  p.font(tick_size);
  for (size_t k = 0; k < xa.ticks.size(); ++k) {
    const double x = crisp(px(xa.ticks[k]));
    p.line(x, Y1, x, Y1 + tick_len, 1);
    p.text(xa.labels[k], x, Y1 + tick_len + gap + tick_h / 2, 0.5);
  }
  for (size_t k = 0; k < ya.ticks.size(); ++k) {
    const double y = crisp(py(ya.ticks[k]));
    p.line(X0 - tick_len, y, X0, y, 1);
    p.text(ya.labels[k], X0 - tick_len - gap, y, 1);
  }

  // Axis titles and the title.
  p.font(axis_title_size);
  p.text("step", (X0 + X1) / 2, o.height - gap * 1.5 - axis_title_h / 2, 0.5);
  cairo_save(cr);
  cairo_translate(cr, gap * 1.5 + axis_title_h / 2, (Y0 + Y1) / 2);
  cairo_rotate(cr, -std::numbers::pi / 2);
  p.text(o.log_y ? "loss (log scale)" : "loss", 0, 0, 0.5);
  cairo_restore(cr);
  std::string title = o.title;
  if (title.empty()) title = multi ? "Training loss" : "Training loss: " + names[0];
  p.font(title_size, true);
  p.text(title, (X0 + X1) / 2, gap * 2 + title_h / 2, 0.5);

  // Legend, top right inside the plot area.
  struct Entry {
    Rgb color;
    std::string label;
    bool val;
  };
  std::vector<Entry> entries;
  char ema_note[48];
  std::snprintf(ema_note, sizeof ema_note, " (EMA %g)", o.smooth);
  for (size_t i = 0; i < logs.size(); ++i) {
    const std::string prefix = multi ? names[i] + " " : "";
    if (std::any_of(logs[i].loss_lm.begin(), logs[i].loss_lm.end(), usable))
      entries.push_back({to_rgb(plot_train_color(i)),
                         prefix + (multi ? "train" : "train (loss_lm)") + (o.smooth > 0 ? ema_note : ""), false});
    if (std::any_of(logs[i].val_loss.begin(), logs[i].val_loss.end(), usable))
      entries.push_back({to_rgb(plot_val_color(i)), prefix + (multi ? "val" : "validation (val_loss)"), true});
  }
  if (!entries.empty()) {
    p.font(legend_size);
    double label_w = 0;
    for (const auto& e : entries) label_w = std::max(label_w, p.text_width(e.label));
    const double row = p.line_height() + 6 * s, pad = 8 * s, sample = 28 * s;
    const double w = pad + sample + gap + label_w + pad, h = pad * 2 + row * entries.size() - 6 * s;
    const double lx = X1 - 10 * s - w, ly = Y0 + 10 * s;
    cairo_rectangle(cr, lx, ly, w, h);
    cairo_set_source_rgba(cr, 1, 1, 1, 0.9);
    cairo_fill_preserve(cr);
    p.color({0.7, 0.7, 0.7});
    cairo_set_line_width(cr, 1);
    cairo_stroke(cr);
    for (size_t k = 0; k < entries.size(); ++k) {
      const double cy = ly + pad + (row - 6 * s) / 2 + row * k;
      p.color(entries[k].color);
      p.line(lx + pad, cy, lx + pad + sample, cy, entries[k].val ? 2 * s : 1.5 * s);
      if (entries[k].val) {
        cairo_arc(cr, lx + pad + sample / 2, cy, 3.5 * s, 0, 2 * std::numbers::pi);
        cairo_fill(cr);
      }
      p.color(ink);
      p.text(entries[k].label, lx + pad + sample + gap, cy, 0);
    }
  }

  if (cairo_status(cr) != CAIRO_STATUS_SUCCESS)
    fail(o.out_path, ": drawing failed: ", cairo_status_to_string(cairo_status(cr)));
  cairo_surface_flush(surface.get());
  std::string png;
  const cairo_status_t st = cairo_surface_write_to_png_stream(surface.get(), append_png, &png);
  if (st != CAIRO_STATUS_SUCCESS) fail(o.out_path, ": PNG encoding failed: ", cairo_status_to_string(st));
  write_file_atomic(o.out_path, png);  // temp file next to it, fsync, rename
}

}  // namespace monet
