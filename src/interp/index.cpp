// Expert index in SQLite.
//
//   meta(key, value)                      model, E, groups, options, tokens indexed
//   documents(doc, path, tokens)          the corpus files indexed so far
//   experts(grp, expert, count, max_prob) how often each expert fired (prob > threshold)
//   activations(grp, expert, prob, doc, pos, token, context, focus)
//                                         its top_k positions; context: JSON array of
//                                         token texts, focus: index of the firing token
#include "monet/index.h"

#include <sqlite3.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "monet/comm.h"
#include "monet/error.h"
#include "monet/evaluate.h"
#include "monet/interp.h"
#include "monet/memory.h"
#include "monet/safetensors.h"
#include "core/checked.h"
#include "interp/sqlite_db.h"

namespace monet {

using sqlite::Db;
using sqlite::Stmt;

namespace {

// One of an expert's top activations: 32 bytes. Its context is rendered
// from the document's tokens when it is written (most entries are displaced
// before that); the tokens of documents with unwritten entries are kept
// until the next commit.
struct Activation {
  float prob;
  int64_t doc, pos;
  int64_t row = -1;  // its rowid in `activations` once written
  // Stronger first; among equal probabilities the earlier position, so that
  // the kept top_k do not depend on the heap's history (resume = one run).
  bool operator>(const Activation& o) const {
    return prob > o.prob || (prob == o.prob && (doc < o.doc || (doc == o.doc && pos < o.pos)));
  }
};

// Per expert: count, max and a min-heap of the top_k activations.
struct ExpertState {
  int64_t count = 0;
  float max_prob = 0;
  bool changed = false;         // count and max differ from the database
  std::vector<Activation> top;  // heap ordered by std::greater: top.front() is the weakest
};

// A rank's partial state, as bytes for the merge on rank 0.
template <class T>
void put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof v);
  std::memcpy(out.data() + at, &v, sizeof v);
}
template <class T>
T take(const std::vector<uint8_t>& in, size_t& at) {
  if (at + sizeof(T) > in.size()) fail("index: a rank's partial state is cut short (", in.size(), " bytes)");
  T v;
  std::memcpy(&v, in.data() + at, sizeof v);
  at += sizeof v;
  return v;
}

constexpr const char* kSchema = R"(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS documents(doc INTEGER PRIMARY KEY, path TEXT UNIQUE, tokens INTEGER);
CREATE TABLE IF NOT EXISTS experts(grp INTEGER, expert INTEGER, count INTEGER, max_prob REAL, PRIMARY KEY(grp, expert));
CREATE TABLE IF NOT EXISTS activations(grp INTEGER, expert INTEGER, prob REAL, doc INTEGER, pos INTEGER,
                                       token TEXT, context TEXT, focus INTEGER);
DROP INDEX IF EXISTS act_token;
CREATE INDEX IF NOT EXISTS experts_by_count ON experts(grp, count DESC);
CREATE INDEX IF NOT EXISTS experts_by_max ON experts(grp, max_prob DESC);
)";
// The activations' indexes, made with the schema and remade by a commit that rebuilds them.
constexpr const char* kActivationIndexes = R"(
CREATE INDEX IF NOT EXISTS act_expert ON activations(grp, expert, prob DESC);
CREATE INDEX IF NOT EXISTS act_token_trim ON activations(trim(token));
)";

// Bounds of the options (and of the counts read back from an index).
constexpr int64_t kMaxTopK = 4096;
constexpr int64_t kMaxWindow = 1024;
constexpr int64_t kMaxTokens = int64_t(1) << 62;

// A token count as written in meta: decimal digits, within [0, kMaxTokens].
bool parse_count(const std::string& text, int64_t* out) {
  if (text.empty() || text.size() > 19 || !std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    return false;
  const uint64_t v = std::stoull(text);
  if (v > uint64_t(kMaxTokens)) return false;
  *out = int64_t(v);
  return true;
}

// No meta, documents, experts or activations rows: an index that never committed.
bool index_is_empty(sqlite3* db) {
  for (const char* table : {"meta", "documents", "experts", "activations"}) {
    Stmt s(db, std::string("SELECT 1 FROM ") + table + " LIMIT 1");
    if (s.step()) return false;
  }
  return true;
}

// FNV-1a over a document's token ids: a resumed partial document must be the
// same text as the one whose first windows the index holds.
uint64_t ids_fingerprint(const std::vector<int32_t>& ids) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t id : ids)
    for (int b = 0; b < 4; b++) h = (h ^ ((uint32_t(id) >> (8 * b)) & 0xffu)) * 1099511628211ull;
  return h;
}

}  // namespace

IndexProgress build_index(const Model& model, const Tokenizer& tok, const std::vector<std::string>& files,
                          const std::string& db_path, const IndexOptions& opts,
                          const std::function<void(const IndexProgress&)>& progress) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  const MonetConfig& c = model.config();
  const int64_t H = c.moe_heads, E = c.moe_experts, groups = c.num_router_layers();
  if (opts.top_k < 1 || opts.top_k > kMaxTopK) fail("index: --top-k ", opts.top_k, " is outside [1, ", kMaxTopK, "]");
  if (opts.window < 0 || opts.window > kMaxWindow)
    fail("index: --window ", opts.window, " is outside [0, ", kMaxWindow, "]");
  if (opts.context < 2 || opts.context > c.max_position_embeddings)
    fail("index: --context ", opts.context, " is outside [2, ", c.max_position_embeddings, "] (max_position_embeddings)");
  if (!(opts.threshold >= 0.0f && opts.threshold < 1.0f))
    fail("index: --threshold ", opts.threshold, " is outside [0, 1)");
  if (opts.checkpoint_tokens < 1 || opts.checkpoint_tokens > kMaxTokens)
    fail("index: --commit-every ", opts.checkpoint_tokens, " is outside [1, ", kMaxTokens, "]");
  if (opts.max_tokens < 0 || opts.max_tokens > kMaxTokens)
    fail("index: --max-tokens ", opts.max_tokens, " is outside [0, ", kMaxTokens, "]");
  // The dense per-expert state is allocated up front: it must fit.
  const uint64_t state_bytes = sat_mul(sat_product({groups, E, E}), sizeof(ExpertState));
  if (const uint64_t avail = available_memory_bytes(); avail > 0 && state_bytes > avail)
    fail("index: the state of ", groups, " groups x ", E, "^2 experts needs ", format_bytes(state_bytes),
         " of memory, but only ", format_bytes(avail), " is available");
  // Distributed (docs/distributed.md): every rank reads and tokenises the
  // corpus and runs its share of the windows (window i of the run on rank
  // i % ranks) into its own partial state; at every commit the partial states
  // are merged on rank 0, which alone opens and writes the database. The top
  // activations are ordered totally (prob, then doc, then pos), so the merged
  // top_k are those of one process.
  std::unique_ptr<Communicator> single = opts.comm ? nullptr : make_single_communicator();
  Communicator& comm = opts.comm ? *opts.comm : *single;
  const int rank = comm.rank(), ranks = comm.size();
  const bool root = rank == 0;
  for (const std::string& f : files)
    if (!fs::is_regular_file(f)) fail(f, ": not a readable corpus file");
  std::optional<Db> db;  // rank 0 only
  const std::string settings = json({{"model", fs::absolute(model.dir()).string()},
                                     {"experts", E}, {"groups", groups}, {"moe_groups", c.moe_groups},
                                     {"top_k", opts.top_k}, {"window", opts.window},
                                     {"context", opts.context}, {"threshold", opts.threshold}}).dump();
  // Rank 0 opens the database; the resume state it reads there reaches the
  // other ranks by the broadcast below.
  if (root) {
    if (!opts.resume && fs::exists(db_path))
      fail(db_path, ": exists; pass --resume to continue it, or choose another path");
    if (opts.resume && !fs::exists(db_path)) fail(db_path, ": no index to resume");
    db.emplace(db_path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX);
    // threads: SQLite's sorts (the activations' indexes a large commit
    // rebuilds) may use the model's threads, idle during a commit (1.4B shape,
    // 9.9 M rows: the trim(token) index 13.2 -> 9.7 s with 2).
    db->exec("PRAGMA journal_mode=WAL; PRAGMA cache_size=-131072; PRAGMA threads=" +
             std::to_string(std::max(1, model.threads())) + ";");
    // The schema and the settings in one transaction, before the first window:
    // a kill at any later moment leaves an index that --resume continues (one
    // with settings and no documents starts from the beginning).
    db->exec("BEGIN IMMEDIATE");
    try {
      db->exec(kSchema);
      db->exec(kActivationIndexes);
      Stmt m(db->get(), "SELECT value FROM meta WHERE key = 'settings'");
      if (!m.step()) {
        // Empty: a new index, or one killed before its first commit by an
        // older version (which wrote the settings only then).
        if (opts.resume && !index_is_empty(db->get())) fail(db_path, ": not a monet index (no settings)");
        Stmt ins(db->get(), "INSERT OR REPLACE INTO meta VALUES (?, ?)");
        ins.bind(1, std::string("settings")).bind(2, settings).run();
        ins.bind(1, std::string("tokens")).bind(2, std::string("0")).run();
        ins.bind(1, std::string("vocab_pieces")).bind(2, std::to_string(tok.vocab_size())).run();
      } else if (m.text(0) != settings) {
        if (!json::parse(m.text(0), nullptr, false).is_object())
          fail(db_path, ": damaged index: meta 'settings' is not a JSON object (", m.text(0).substr(0, 200), ")");
        fail(db_path, ": was built with other settings (", m.text(0), "); resume needs the same model and options");
      }
      db->exec("COMMIT");
    } catch (...) {
      sqlite3_exec(db->get(), "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }
  }
  // Dense per group (E^2 entries): the per-token bookkeeping is array indexing.
  std::vector<std::vector<ExpertState>> state(static_cast<size_t>(groups), std::vector<ExpertState>(size_t(E * E)));
  // Rows of written activations pushed out of a top_k since the last commit, per group.
  std::vector<std::vector<int64_t>> displaced(static_cast<size_t>(groups));
  std::unordered_map<std::string, int64_t> done_docs;
  // The document an earlier run stopped inside, until this run takes it up:
  // {"path", "doc", "next" (its first token not indexed), "fingerprint"}.
  json partial;
  int64_t tokens_indexed = 0, next_doc = 0;
  if (opts.resume && root) {
    // Everything read back is checked against the settings before it is
    // used as an index into the state: a damaged index is refused, never trusted.
    auto damaged = [&](const auto&... what) { fail(db_path, ": damaged index: ", what..., "; build the index again"); };
    Stmt t(db->get(), "SELECT value FROM meta WHERE key = 'tokens'");
    if (t.step()) {
      const std::string text = t.text(0);
      if (!parse_count(text, &tokens_indexed)) damaged("meta 'tokens' = '", text.substr(0, 100), "' is not a token count");
    }
    Stmt p(db->get(), "SELECT value FROM meta WHERE key = 'partial'");
    if (p.step()) {
      partial = json::parse(p.text(0), nullptr, /*allow_exceptions=*/false);
      const bool ok = partial.is_object() && partial.contains("path") && partial["path"].is_string() &&
                      partial.contains("doc") && partial["doc"].is_number_integer() && partial["doc"].get<int64_t>() >= 0 &&
                      partial["doc"].get<int64_t>() < kMaxTokens && partial.contains("next") &&
                      partial["next"].is_number_integer() && partial["next"].get<int64_t>() >= 0 &&
                      partial["next"].get<int64_t>() <= kMaxTokens && partial.contains("fingerprint") &&
                      partial["fingerprint"].is_string();
      if (!ok) damaged("meta 'partial' = ", p.text(0).substr(0, 200), " is not {path, doc, next, fingerprint}");
    }
    std::unordered_map<int64_t, int64_t> doc_length;  // doc -> tokens indexed (the partial one: so far)
    Stmt d(db->get(), "SELECT doc, path, tokens FROM documents");
    for (int64_t row = 0; d.step(); row++) {
      if (d.type(0) != SQLITE_INTEGER || d.i64(0) < 0 || d.i64(0) >= kMaxTokens || d.type(1) != SQLITE_TEXT ||
          d.type(2) != SQLITE_INTEGER || d.i64(2) < 0 || d.i64(2) > kMaxTokens)
        damaged("documents row ", row, " is not (doc >= 0, path, tokens >= 0)");
      done_docs[d.text(1)] = d.i64(0);
      doc_length[d.i64(0)] = d.i64(2);
      next_doc = std::max(next_doc, d.i64(0) + 1);
    }
    if (partial.is_object()) {
      const int64_t doc = partial["doc"].get<int64_t>();
      if (doc_length.count(doc) || done_docs.count(partial["path"].get<std::string>()))
        damaged("meta 'partial' names document ", doc, " (", partial["path"].get<std::string>(), "), which is finished");
      doc_length[doc] = partial["next"].get<int64_t>();
      next_doc = std::max(next_doc, doc + 1);
    }
    const int64_t experts = E * E;
    auto check_expert = [&](const char* table, int64_t row, const Stmt& s) {
      if (s.type(0) != SQLITE_INTEGER || s.i64(0) < 0 || s.i64(0) >= groups)
        damaged(table, " row ", row, ": grp ", s.text(0).substr(0, 40), " is outside [0, ", groups, ")");
      if (s.type(1) != SQLITE_INTEGER || s.i64(1) < 0 || s.i64(1) >= experts)
        damaged(table, " row ", row, ": expert ", s.text(1).substr(0, 40), " is outside [0, ", experts, ")");
    };
    // A probability is sum_h g1 g2: within [0, H] (a little slack for float sums).
    auto valid_prob = [&](const Stmt& s, int c) {
      const double v = s.f64(c);
      return (s.type(c) == SQLITE_FLOAT || s.type(c) == SQLITE_INTEGER) && std::isfinite(v) && v >= 0 &&
             v <= double(H) * 1.001;
    };
    Stmt e(db->get(), "SELECT grp, expert, count, max_prob FROM experts");
    for (int64_t row = 0; e.step(); row++) {
      check_expert("experts", row, e);
      if (e.type(2) != SQLITE_INTEGER || e.i64(2) < 0 || e.i64(2) > kMaxTokens)
        damaged("experts row ", row, ": count ", e.text(2).substr(0, 40), " is not a count");
      if (!valid_prob(e, 3)) damaged("experts row ", row, ": max_prob ", e.text(3).substr(0, 40), " is not in [0, ", H, "]");
      ExpertState& s = state[size_t(e.i64(0))][size_t(e.i64(1))];
      s.count = e.i64(2);
      s.max_prob = float(e.f64(3));
    }
    Stmt a(db->get(), "SELECT grp, expert, prob, doc, pos, rowid FROM activations");
    for (int64_t row = 0; a.step(); row++) {
      check_expert("activations", row, a);
      if (!valid_prob(a, 2)) damaged("activations row ", row, ": prob ", a.text(2).substr(0, 40), " is not in [0, ", H, "]");
      auto len = doc_length.find(a.i64(3));
      if (a.type(3) != SQLITE_INTEGER || len == doc_length.end())
        damaged("activations row ", row, ": doc ", a.text(3).substr(0, 40), " is not an indexed document");
      if (a.type(4) != SQLITE_INTEGER || a.i64(4) < 0 || a.i64(4) >= len->second)
        damaged("activations row ", row, ": pos ", a.text(4).substr(0, 40), " is outside document ", a.i64(3),
                " ([0, ", len->second, "))");
      ExpertState& s = state[size_t(a.i64(0))][size_t(a.i64(1))];
      if (int64_t(s.top.size()) == opts.top_k)
        damaged("expert ", a.i64(1), " of group ", a.i64(0), " has more than --top-k ", opts.top_k, " activations");
      s.top.push_back({float(a.f64(2)), a.i64(3), a.i64(4), a.i64(5)});
    }
    for (auto& g : state)
      for (ExpertState& s : g) {
        if (s.count < int64_t(s.top.size())) damaged("an expert has more top activations than its count");
        std::make_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
      }
  }
  if (ranks > 1) {
    // What the other ranks need of rank 0's resume state: the finished
    // documents, where it stopped, the counters (their experts start empty).
    json resume_state{{"partial", partial}, {"tokens", tokens_indexed}, {"next_doc", next_doc}, {"done", json::object()}};
    for (const auto& [path, doc] : done_docs) resume_state["done"][path] = doc;
    const json got = json::parse(broadcast_string(comm, root ? resume_state.dump() : std::string(), 0));
    if (!root) {
      partial = got["partial"];
      tokens_indexed = got["tokens"].get<int64_t>();
      next_doc = got["next_doc"].get<int64_t>();
      for (const auto& [path, doc] : got["done"].items()) done_docs[path] = doc.get<int64_t>();
    }
  }

  // Files are read and tokenised one at a time: memory does not grow with the corpus.
  std::vector<std::string> todo;
  IndexProgress prog;
  for (const std::string& f : files) {
    const std::string key = fs::absolute(f).string();
    if (done_docs.count(key) || std::find(todo.begin(), todo.end(), key) != todo.end()) continue;
    todo.push_back(key);
    prog.bytes_total += int64_t(fs::file_size(f));
  }
  // Token texts, plain and as JSON strings, made once: a commit writes up to groups x E^2 x top_k of them.
  std::vector<std::string> token_text(size_t(tok.vocab_size())), token_json(token_text.size());
  for (size_t id = 0; id < token_text.size(); id++) {
    token_text[id] = tok.token_text(int32_t(id));
    token_json[id] = json(token_text[id]).dump();
  }
  // Token ids of the documents that may have unwritten activations: the
  // current one and those finished since the last commit.
  std::map<int64_t, std::shared_ptr<const std::vector<int32_t>>> doc_tokens;
  int64_t current_doc = -1;

  std::vector<std::pair<std::string, int64_t>> pending_docs;  // finished since the last commit: path, tokens
  int64_t since_commit = 0, commits = 0;
  // Writes what changed since the last commit: displaced rows out, new top
  // activations in, the counts of experts that fired, finished documents and
  // where the run is inside a document (now_partial, or null).
  auto commit = [&](const json& now_partial) {
    // A commit that writes at least half as many rows as stay drops the
    // activations' indexes and builds them again after (one sort each), not
    // row by row in act_token_trim's random order: the 1.4B shape's first
    // commit (11.4 M rows) took 42 s instead of 52 s.
    int64_t rows_kept = 0, rows_new = 0;
    for (const auto& g : state)
      for (const ExpertState& s : g)
        for (const Activation& a : s.top) (a.row >= 0 ? rows_kept : rows_new)++;
    const bool rebuild_indexes = rows_new >= rows_kept / 2 && rows_new > 0;
    db->exec("BEGIN IMMEDIATE");
    try {
      if (rebuild_indexes) db->exec("DROP INDEX IF EXISTS act_expert; DROP INDEX IF EXISTS act_token_trim;");
      Stmt del_a(db->get(), "DELETE FROM activations WHERE rowid = ?");
      for (std::vector<int64_t>& rows : displaced)
        for (int64_t row : rows) del_a.bind(1, row).run();
      Stmt put_e(db->get(), "INSERT OR REPLACE INTO experts VALUES (?, ?, ?, ?)");
      Stmt ins_a(db->get(), "INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
      for (int64_t g = 0; g < groups; g++)
        for (int64_t id = 0; id < E * E; id++) {
          ExpertState& s = state[size_t(g)][size_t(id)];
          if (!s.changed) continue;  // a new top activation always comes with a count change
          put_e.bind(1, g).bind(2, id).bind(3, s.count).bind(4, double(s.max_prob)).run();
          for (Activation& a : s.top) {
            if (a.row >= 0) continue;
            // The context: --window tokens on each side, within the document.
            const std::vector<int32_t>& ids = *doc_tokens.at(a.doc);
            const int64_t lo = std::max<int64_t>(0, a.pos - opts.window);
            const int64_t hi = std::min<int64_t>(int64_t(ids.size()), a.pos + opts.window + 1);
            std::string context(1, '[');
            for (int64_t k = lo; k < hi; k++) {
              if (k > lo) context += ',';
              context += token_json[size_t(ids[size_t(k)])];
            }
            context += ']';
            ins_a.bind(1, g).bind(2, id).bind(3, double(a.prob)).bind(4, a.doc).bind(5, a.pos)
                .bind(6, token_text[size_t(ids[size_t(a.pos)])]).bind(7, context).bind(8, a.pos - lo).run();
            a.row = sqlite3_last_insert_rowid(db->get());
          }
        }
      if (rebuild_indexes) db->exec(kActivationIndexes);
      Stmt ins_d(db->get(), "INSERT OR REPLACE INTO documents VALUES (?, ?, ?)");
      for (const auto& [path, n] : pending_docs) ins_d.bind(1, done_docs[path]).bind(2, path).bind(3, n).run();
      Stmt ins_m(db->get(), "INSERT OR REPLACE INTO meta VALUES (?, ?)");
      ins_m.bind(1, std::string("settings")).bind(2, settings).run();
      ins_m.bind(1, std::string("tokens")).bind(2, std::to_string(tokens_indexed)).run();
      ins_m.bind(1, std::string("vocab_pieces")).bind(2, std::to_string(tok.vocab_size())).run();
      if (now_partial.is_object())
        ins_m.bind(1, std::string("partial")).bind(2, now_partial.dump()).run();
      else
        db->exec("DELETE FROM meta WHERE key = 'partial'");
      db->exec("COMMIT");
    } catch (const Error& e) {
      // A full disk, a file size limit, a read-only file: nothing of this
      // commit is kept, the index stays at its last commit.
      const int err = sqlite3_system_errno(db->get());
      sqlite3_exec(db->get(), "ROLLBACK", nullptr, nullptr, nullptr);
      std::string why = e.what();
      if (why.compare(0, db_path.size() + 2, db_path + ": ") == 0) why.erase(0, db_path.size() + 2);
      if (err) why += std::string(": ") + std::strerror(err);
      fail(db_path, ": cannot write the index (", why, "); it keeps its last commit, which --resume continues");
    }
    commits++;
    pending_docs.clear();
    since_commit = 0;
    for (std::vector<int64_t>& rows : displaced) rows.clear();
    for (auto& g : state)
      for (ExpertState& s : g) s.changed = false;
    // Every activation is written: only the current document's tokens are still needed.
    for (auto it = doc_tokens.begin(); it != doc_tokens.end();) it = it->first == current_doc ? std::next(it) : doc_tokens.erase(it);
  };

  // A window's routing into the state (rank 0: the index's; other ranks:
  // their partial state since the last merge).
  auto absorb = [&](const std::vector<int32_t>& window, size_t first, size_t start, const RouterCapture& cap,
                    int64_t doc) {
    // Router groups keep separate state: one thread each.
#pragma omp parallel for schedule(dynamic, 1) num_threads(model.threads())
    for (int64_t g = 0; g < groups; g++) {
      // The experts' states are random reads in E^2 of them, and so are their
      // heaps: three tokens in flight (a token's experts found and their
      // states prefetched, the next one's heaps prefetched, one absorbed).
      std::vector<ExpertState>& states = state[size_t(g)];
      std::vector<ExpertActivation> acts[3];
      auto find = [&](size_t t, std::vector<ExpertActivation>& act) {
        act.clear();
        if (t >= window.size()) return;
        active_experts(cap.g1[size_t(g)].data() + t * size_t(H * E), cap.g2[size_t(g)].data() + t * size_t(H * E),
                       H, E, opts.threshold, act);
        for (const ExpertActivation& a : act) {
          const char* line = reinterpret_cast<const char*>(&states[size_t(a.id)]);
          __builtin_prefetch(line, 1);
          __builtin_prefetch(line + sizeof(ExpertState) - 1, 1);
        }
      };
      find(first, acts[0]);
      find(first + 1, acts[1]);
      for (size_t t = first; t < window.size(); t++) {
        const std::vector<ExpertActivation>& act = acts[(t - first) % 3];
        for (const ExpertActivation& a : acts[(t - first + 1) % 3])
          if (const Activation* top = states[size_t(a.id)].top.data()) __builtin_prefetch(top, 1);
        find(t + 2, acts[(t - first + 2) % 3]);
        const int64_t pos = int64_t(start + t - first);
        for (const ExpertActivation& a : act) {
          ExpertState& s = states[size_t(a.id)];
          s.count++;
          s.max_prob = std::max(s.max_prob, a.prob);
          s.changed = true;
          // Positions come in order here: an equal probability is a later, weaker entry.
          if (int64_t(s.top.size()) == opts.top_k && !(a.prob > s.top.front().prob)) continue;
          const Activation entry{a.prob, doc, pos};
          if (int64_t(s.top.size()) == opts.top_k) {
            std::pop_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
            if (s.top.back().row >= 0) displaced[size_t(g)].push_back(s.top.back().row);
            s.top.back() = entry;
          } else {
            s.top.push_back(entry);
          }
          std::push_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
        }
      }
    }
  };
  // The other ranks' partial states into rank 0's (counts add, maxima, the
  // top_k of the union); theirs start empty again.
  auto merge = [&] {
    if (ranks == 1) return;
    std::vector<uint8_t> mine;
    if (!root)
      for (int64_t g = 0; g < groups; g++)
        for (int64_t id = 0; id < E * E; id++) {
          ExpertState& s = state[size_t(g)][size_t(id)];
          if (!s.changed) continue;
          put<int64_t>(mine, g);
          put<int64_t>(mine, id);
          put<int64_t>(mine, s.count);
          put<float>(mine, s.max_prob);
          put<int64_t>(mine, int64_t(s.top.size()));
          for (const Activation& a : s.top) {
            put<float>(mine, a.prob);
            put<int64_t>(mine, a.doc);
            put<int64_t>(mine, a.pos);
          }
          s = ExpertState();
        }
    const std::vector<std::vector<uint8_t>> parts = comm.gather(mine, 0);
    for (size_t r = 1; r < parts.size(); r++) {
      const std::vector<uint8_t>& in = parts[r];
      for (size_t at = 0; at < in.size();) {
        const int64_t g = take<int64_t>(in, at), id = take<int64_t>(in, at);
        if (g < 0 || g >= groups || id < 0 || id >= E * E) fail("index: rank ", r, " sent expert ", id, " of group ", g);
        ExpertState& s = state[size_t(g)][size_t(id)];
        s.count += take<int64_t>(in, at);
        s.max_prob = std::max(s.max_prob, take<float>(in, at));
        s.changed = true;
        const int64_t n = take<int64_t>(in, at);
        for (int64_t i = 0; i < n; i++) {
          Activation entry;
          entry.prob = take<float>(in, at);
          entry.doc = take<int64_t>(in, at);
          entry.pos = take<int64_t>(in, at);
          if (int64_t(s.top.size()) < opts.top_k) {
            s.top.push_back(entry);
            std::push_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
          } else if (entry > s.top.front()) {  // the full order: ranks' positions interleave
            std::pop_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
            if (s.top.back().row >= 0) displaced[size_t(g)].push_back(s.top.back().row);
            s.top.back() = entry;
            std::push_heap(s.top.begin(), s.top.end(), std::greater<Activation>());
          }
        }
      }
    }
  };
  // A commit point (the same on every rank: the counters are the run's):
  // merge, then rank 0 writes; the others only follow the bookkeeping.
  auto commit_all = [&](const json& now_partial) {
    merge();
    if (root) {
      commit(now_partial);
    } else {
      commits++;
      pending_docs.clear();
      since_commit = 0;
    }
  };

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  ForwardOptions fo;
  fo.routing_only = true;
  const size_t step = size_t(opts.context) - (tok.bos_id() >= 0 ? 1 : 0);
  // Windows go out in chunks: a commit point ends a chunk, and a chunk holds
  // a few windows per thread of every rank (progress in between).
  const int64_t chunk_windows = int64_t(ranks) * std::max(1, model.threads()) * 4;
  int64_t window_counter = 0;  // windows of this run so far, all ranks together
  int64_t bytes_before = 0;
  for (const std::string& path : todo) {
    if (opts.max_tokens > 0 && prog.tokens_done >= opts.max_tokens) break;
    const int64_t doc_bytes = int64_t(fs::file_size(path));
    const auto tokens = std::make_shared<const std::vector<int32_t>>(tok.encode(read_file(path), false));
    const std::vector<int32_t>& ids = *tokens;
    const std::string fingerprint = std::to_string(ids_fingerprint(ids));
    int64_t doc = -1;
    size_t begin = 0;
    if (partial.is_object() && partial["path"] == path) {
      const size_t next = partial["next"].get<size_t>();
      if (partial.value("fingerprint", "") != fingerprint || next > ids.size() || next % step != 0)
        fail(path, ": changed since the index stopped inside it (token ", next, " of ", ids.size(),
             "); index it under another path or build a new index");
      doc = partial["doc"].get<int64_t>();
      begin = next;
      partial = nullptr;  // from here on, the commits below say where this run is
    } else {
      doc = next_doc++;
    }
    done_docs[path] = doc;
    if (root) doc_tokens[doc] = tokens;  // contexts are rendered on rank 0
    current_doc = doc;
    auto inside = [&](size_t next) {
      return json{{"path", path}, {"doc", doc}, {"next", next}, {"fingerprint", fingerprint}};
    };
    // With --max-tokens, whole windows up to the budget.
    size_t end = ids.size();
    if (opts.max_tokens > 0) {
      const size_t budget = size_t(opts.max_tokens - prog.tokens_done);
      end = std::min(end, begin + (budget + step - 1) / step * step);
    }
    const size_t stop = std::min(end, ids.size());
    const int64_t doc_bytes_done = int64_t(double(doc_bytes) * double(begin) / double(std::max<size_t>(1, ids.size())));
    prog.bytes_total -= doc_bytes_done;  // bytes of this run: what was indexed before is not counted
    for (size_t w = begin; w < stop;) {
      std::vector<size_t> mine;
      int64_t chunk_tokens = 0;
      for (int64_t k = 0; k < chunk_windows && w < stop; k++) {
        const int64_t n = int64_t(std::min(step, ids.size() - w));
        if (window_counter++ % ranks == rank) mine.push_back(w);
        chunk_tokens += n;
        since_commit += n;
        w += step;
        if (since_commit >= opts.checkpoint_tokens) break;
      }
      for_each_window_at(model, ids, opts.context, tok.bos_id(), fo,
                         [&](const std::vector<int32_t>& window, size_t first, size_t start, const std::vector<float>&,
                             const RouterCapture& cap) { absorb(window, first, start, cap, doc); },
                         mine);
      const size_t next = std::min(w, ids.size());
      tokens_indexed += chunk_tokens;
      prog.tokens_done += chunk_tokens;
      prog.bytes_done = bytes_before + int64_t(double(doc_bytes) * double(next) / double(ids.size())) - doc_bytes_done;
      if (since_commit >= opts.checkpoint_tokens && next < ids.size()) commit_all(inside(next));
      prog.seconds = elapsed();
      if (progress && root) progress(prog);
    }
    current_doc = -1;  // its tokens stay in doc_tokens until its activations are written
    if (stop < ids.size()) {  // --max-tokens ran out inside this document
      commit_all(inside(stop));
      break;
    }
    bytes_before += doc_bytes - doc_bytes_done;
    prog.bytes_done = bytes_before;
    pending_docs.emplace_back(path, int64_t(ids.size()));
    if (since_commit >= opts.checkpoint_tokens) commit_all(partial);
    prog.seconds = elapsed();
    if (progress && root) progress(prog);
  }
  if (since_commit > 0 || !pending_docs.empty() || (!opts.resume && commits == 0)) commit_all(partial);
  prog.seconds = elapsed();
  return prog;
}

}  // namespace monet
