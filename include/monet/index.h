// The expert index: for every (router group, expert), the corpus positions
// that activate it most, with their context, and how often it fires.
// Stored in SQLite (schema in src/interp/index.cpp).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "monet/model.h"
#include "monet/tokenizer.h"

struct sqlite3;

namespace monet { class Communicator; }

namespace monet {

struct IndexOptions {
  int64_t top_k = 32;          // contexts kept per expert
  int64_t window = 8;          // tokens of context on each side
  int64_t context = 256;       // tokens per forward window (BOS included)
  float threshold = 0.01f;     // an expert "fires" on a token above this probability
  bool resume = false;         // continue an existing index (skips its documents, continues inside a partial one)
  int64_t checkpoint_tokens = 200000;  // commit the state to the database this often (tokens)
  int64_t max_tokens = 0;      // stop after about this many tokens (whole windows; 0: the whole corpus)
  // Distributed (docs/distributed.md): the windows are shared among comm's
  // ranks, rank 0 merges and writes the index. null: one process.
  Communicator* comm = nullptr;
};

struct IndexProgress {
  int64_t tokens_done = 0;
  int64_t bytes_done = 0, bytes_total = 0;  // of corpus text (files are tokenised one at a time)
  double seconds = 0;
};

// Streams the corpus files through the model and writes/updates the index.
// Memory is bounded by groups x E^2 x top_k entries (32 bytes each) plus the
// tokens of the files read since the last commit, whatever the corpus size.
// Every checkpoint_tokens the changes since the last commit are written in
// one transaction (also in the middle of a file): interrupting leaves the
// last committed state, from which --resume continues at the window where it
// stopped. Returns the totals of this run, its seconds including the final
// commit.
IndexProgress build_index(const Model& model, const Tokenizer& tok, const std::vector<std::string>& files,
                 const std::string& db_path, const IndexOptions& opts,
                 const std::function<void(const IndexProgress&)>& progress = nullptr);

// What an index was built with (its meta 'settings'), checked when read.
struct IndexSettings {
  std::string model;  // the checkpoint directory (absolute)
  int64_t experts = 0, groups = 0, moe_groups = 0, top_k = 0, window = 0, context = 0;
  double threshold = 0;
};

struct ExpertSummary {
  int64_t expert = 0, count = 0;
  double density = 0, max_prob = 0;  // density: count / tokens indexed
};

struct ExpertContext {
  double prob = 0;
  int64_t doc = 0, pos = 0;
  std::string token;                 // the firing token's text
  std::vector<std::string> context;  // token texts around it
  int64_t focus = 0;                 // the firing token's place in context
};

struct ExpertDetail {
  ExpertSummary summary;
  std::vector<ExpertContext> contexts;  // strongest first
};

struct TokenMatch {
  int64_t group = 0, expert = 0, contexts = 0;  // contexts: top contexts of the expert firing on the token
  double max_prob = 0;
};

enum class ExpertOrder { Count, MaxProb, Id };

// Read access to an index (the viewer's data). Every value read back is
// checked against the index's settings: a damaged index gives a
// monet::Error naming the file, never a crash.
class IndexReader {
 public:
  explicit IndexReader(const std::string& db_path);
  ~IndexReader();
  IndexReader(const IndexReader&) = delete;
  IndexReader& operator=(const IndexReader&) = delete;

  const std::string& path() const { return path_; }
  const IndexSettings& settings() const { return settings_; }
  int64_t tokens() const;  // tokens indexed so far
  std::string meta(const std::string& key) const;

  // The experts of a group that fired, in the given order; total: how many fired.
  std::vector<ExpertSummary> experts(int64_t group, ExpertOrder order, int64_t limit, int64_t offset,
                                     int64_t* total = nullptr) const;
  ExpertDetail expert(int64_t group, int64_t expert) const;  // count 0 and no contexts when it never fired
  std::vector<TokenMatch> search(const std::string& token, int64_t limit) const;

 private:
  void check_expert(int64_t group, int64_t expert) const;
  sqlite3* db_ = nullptr;
  std::string path_;
  IndexSettings settings_;
};

}  // namespace monet
