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

namespace monet {

struct IndexOptions {
  int64_t top_k = 32;          // contexts kept per expert
  int64_t window = 8;          // tokens of context on each side
  int64_t context = 256;       // tokens per forward window (BOS included)
  float threshold = 0.01f;     // an expert "fires" on a token above this probability
  bool resume = false;         // continue an existing index (skips its documents, continues inside a partial one)
  int64_t checkpoint_tokens = 200000;  // commit the state to the database this often (tokens)
  int64_t max_tokens = 0;      // stop after about this many tokens (whole windows; 0: the whole corpus)
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

// Read access for the viewer.
class IndexReader {
 public:
  explicit IndexReader(const std::string& db_path);
  ~IndexReader();
  IndexReader(const IndexReader&) = delete;
  IndexReader& operator=(const IndexReader&) = delete;

  std::string meta(const std::string& key) const;
  // JSON texts for the HTTP API.
  std::string experts_json(int64_t group, const std::string& order, int64_t limit, int64_t offset) const;
  std::string expert_json(int64_t group, int64_t expert) const;  // contexts, count, density
  std::string search_json(const std::string& token, int64_t limit) const;

 private:
  sqlite3* db_ = nullptr;
  std::string path_;
};

}  // namespace monet
