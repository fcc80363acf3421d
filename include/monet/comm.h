// Communicators: the collectives of data-parallel training and indexing
// (docs/distributed.md). The library talks to other processes only through
// this interface; a single-process implementation is always built, an MPI
// one when CMake finds MPI (MONET_MPI), and an NCCL one would be a third
// implementation (docs/distributed.md says where and how).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace monet {

// Time and payload of the collectives a communicator ran (for the scaling
// figures: bytes are what this rank contributed, not what the network carried).
struct CommStats {
  int64_t calls = 0;
  int64_t bytes = 0;
  double seconds = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "single", "mpi"

  // In place: every rank ends with the element-wise sum over all ranks.
  virtual void all_reduce_sum(float* data, size_t n) = 0;
  virtual void all_reduce_sum(double* data, size_t n) = 0;
  virtual void all_reduce_sum(int64_t* data, size_t n) = 0;
  // in: size() blocks of n; out: n, the sum over ranks of block rank().
  virtual void reduce_scatter_sum(const float* in, float* out, size_t n) = 0;
  virtual void reduce_scatter_sum(const double* in, double* out, size_t n) = 0;
  // in: `bytes` from every rank; out: size() * bytes, rank order.
  virtual void all_gather(const void* in, void* out, size_t bytes) = 0;
  // Variable sizes, to one rank: root gets every rank's buffer (rank order),
  // the others an empty list.
  virtual std::vector<std::vector<uint8_t>> gather(const std::vector<uint8_t>& mine, int root) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;

  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats(); }

 protected:
  CommStats stats_;
};

// One process: rank 0 of 1; every collective is a copy (or nothing).
std::unique_ptr<Communicator> make_single_communicator();

// True when this build has the MPI communicator (CMake found MPI).
bool mpi_available();

// MPI_COMM_WORLD, duplicated (the library's messages never mix with the
// caller's). MPI is the front end's: it calls MPI_Init before and
// MPI_Finalize after; monet::Error when MPI is not initialised or not built.
std::unique_ptr<Communicator> make_mpi_communicator();

// A string broadcast from root (its size first), for small settings.
std::string broadcast_string(Communicator& comm, const std::string& text, int root);

}  // namespace monet
