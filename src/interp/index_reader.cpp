// Reading an expert index (IndexReader): every row read back is checked
// against the index's settings, and a damaged index is refused, never trusted.
#include <sqlite3.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "interp/sqlite_db.h"
#include "monet/error.h"
#include "monet/index.h"

namespace monet {

using sqlite::Db;
using sqlite::Stmt;

namespace {

IndexSettings parse_settings(const std::string& text, const std::string& path) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) fail(path, ": damaged index (its settings are not a JSON object)");
  auto integer = [&](const char* key, int64_t lo, int64_t hi) {
    if (!j.contains(key) || !j[key].is_number_integer())
      fail(path, ": damaged index (settings field \"", key, "\" is not an integer)");
    const int64_t v = j[key].get<int64_t>();
    if (v < lo || v > hi) fail(path, ": damaged index (settings field \"", key, "\" = ", v, " is outside [", lo, ", ", hi, "])");
    return v;
  };
  IndexSettings s;
  if (!j.contains("model") || !j["model"].is_string()) fail(path, ": damaged index (its settings name no model)");
  s.model = j["model"].get<std::string>();
  s.experts = integer("experts", 1, 1 << 20);
  s.groups = integer("groups", 1, 1 << 16);
  s.moe_groups = integer("moe_groups", 1, 1 << 16);
  s.top_k = integer("top_k", 1, 1 << 20);
  s.window = integer("window", 0, 1 << 20);
  s.context = integer("context", 2, 1 << 30);
  if (!j.contains("threshold") || !j["threshold"].is_number()) fail(path, ": damaged index (settings field \"threshold\")");
  s.threshold = j["threshold"].get<double>();
  return s;
}

}  // namespace

IndexReader::IndexReader(const std::string& db_path) : path_(db_path) {
  if (!std::filesystem::exists(db_path)) fail(db_path, ": no such index");
  Db db(db_path, SQLITE_OPEN_READONLY);
  try {
    Stmt m(db.get(), "SELECT value FROM meta WHERE key = 'settings'");
    if (!m.step()) fail(db_path, ": not a monet index (no settings)");
    settings_ = parse_settings(m.text(0), db_path);
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind(db_path, 0) == 0) throw;
    fail(db_path, ": not a monet index (", what, ")");
  }
  db_ = db.release();
}

IndexReader::~IndexReader() { sqlite3_close(db_); }

std::string IndexReader::meta(const std::string& key) const {
  Stmt m(db_, "SELECT value FROM meta WHERE key = ?");
  m.bind(1, key);
  return m.step() ? m.text(0) : "";
}

int64_t IndexReader::tokens() const {
  const std::string t = meta("tokens");
  if (t.empty()) return 0;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  if (*end != '\0' || errno != 0 || v < 0) fail(path_, ": damaged index (meta tokens = \"", t, "\" is not a count)");
  return v;
}

void IndexReader::check_expert(int64_t group, int64_t expert) const {
  if (group < 0 || group >= settings_.groups || expert < 0 || expert >= settings_.experts * settings_.experts)
    fail(path_, ": damaged index (a row names expert ", expert, " of group ", group, "; the index has ",
         settings_.groups, " groups of ", settings_.experts * settings_.experts, " experts)");
}

std::vector<ExpertSummary> IndexReader::experts(int64_t group, ExpertOrder order, int64_t limit, int64_t offset,
                                                int64_t* total) const {
  const std::string by = order == ExpertOrder::MaxProb ? "max_prob DESC" : order == ExpertOrder::Id ? "expert ASC" : "count DESC";
  Stmt s(db_, "SELECT expert, count, max_prob FROM experts WHERE grp = ? ORDER BY " + by + " LIMIT ? OFFSET ?");
  s.bind(1, group).bind(2, limit).bind(3, offset);
  const double n_tokens = double(std::max<int64_t>(1, tokens()));
  std::vector<ExpertSummary> out;
  while (s.step()) {
    check_expert(group, s.i64(0));
    out.push_back({s.i64(0), s.i64(1), double(s.i64(1)) / n_tokens, s.f64(2)});
  }
  if (total) {
    Stmt n(db_, "SELECT COUNT(*) FROM experts WHERE grp = ?");
    n.bind(1, group);
    n.step();
    *total = n.i64(0);
  }
  return out;
}

ExpertDetail IndexReader::expert(int64_t group, int64_t expert) const {
  check_expert(group, expert);
  ExpertDetail out;
  out.summary.expert = expert;
  Stmt e(db_, "SELECT count, max_prob FROM experts WHERE grp = ? AND expert = ?");
  e.bind(1, group).bind(2, expert);
  if (e.step()) {
    out.summary.count = e.i64(0);
    out.summary.density = double(e.i64(0)) / double(std::max<int64_t>(1, tokens()));
    out.summary.max_prob = e.f64(1);
  }
  Stmt a(db_, "SELECT prob, doc, pos, token, context, focus FROM activations WHERE grp = ? AND expert = ? "
              "ORDER BY prob DESC, doc, pos");
  a.bind(1, group).bind(2, expert);
  while (a.step()) {
    ExpertContext ctx{a.f64(0), a.i64(1), a.i64(2), a.text(3), {}, a.i64(5)};
    const nlohmann::json words = nlohmann::json::parse(a.text(4), nullptr, /*allow_exceptions=*/false);
    bool ok = words.is_array() && ctx.focus >= 0 && ctx.focus < int64_t(words.size());
    for (size_t k = 0; ok && k < words.size(); k++) {
      ok = words[k].is_string();
      if (ok) ctx.context.push_back(words[k].get<std::string>());
    }
    if (!ok) fail(path_, ": damaged index (a context of expert ", expert, " of group ", group, " is not a token list with its focus)");
    out.contexts.push_back(std::move(ctx));
  }
  return out;
}

std::vector<TokenMatch> IndexReader::search(const std::string& token, int64_t limit) const {
  // Experts whose top contexts fire on this token (trimmed), most often first.
  Stmt s(db_, "SELECT grp, expert, COUNT(*) AS n, MAX(prob) FROM activations WHERE trim(token) = trim(?) "
              "GROUP BY grp, expert ORDER BY n DESC, MAX(prob) DESC LIMIT ?");
  s.bind(1, token).bind(2, limit);
  std::vector<TokenMatch> out;
  while (s.step()) {
    check_expert(s.i64(0), s.i64(1));
    out.push_back({s.i64(0), s.i64(1), s.i64(2), s.f64(3)});
  }
  return out;
}

}  // namespace monet
