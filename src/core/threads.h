// Per-call thread counts for code that runs plain OpenMP loops (the trainer):
// sets the calling thread's OpenMP team size for a scope and restores it
// afterwards, so the library never changes the process's default.
#pragma once
#include <omp.h>

namespace monet {

class ScopedThreads {
 public:
  explicit ScopedThreads(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads > 0 ? threads : omp_get_num_procs());
  }
  ~ScopedThreads() { omp_set_num_threads(saved_); }
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int saved_;
};

}  // namespace monet
