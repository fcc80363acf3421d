// All-reduce benchmark of the MPI communicator (docs/distributed.md): the sum
// of a float32 buffer over every rank, as data-parallel training runs it on
// the gradients once per step. Run under mpirun:
//
//   mpirun -np 2 build/monet_allreduce_bench [--floats N ...] [--reps 20]
//
// Rank 0 prints per size: the best-of-reps time (a barrier before each
// repetition, so no rank's lateness is counted), the algorithm bandwidth
// (bytes / time), the bus bandwidth (NCCL's convention, 2 (P-1)/P bytes /
// time: what each rank's link carries in a ring all-reduce), and the physical
// limit on one machine: the memory copy bandwidth one core reaches on a
// buffer of the same size (a shared-memory all-reduce at least copies the
// data in and out once).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "monet/comm.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double best_memcpy_seconds(size_t bytes, int reps) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::min(best, seconds_since(t0));
    a[size_t(r) % bytes] = b[(size_t(r) * 7) % bytes];  // keeps the copies from being folded away
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::vector<size_t> sizes;
  int reps = 20;
  for (int i = 1; i < argc; i++) {
    const std::string arg = argv[i];
    if (arg == "--floats" && i + 1 < argc) sizes.push_back(size_t(std::strtoull(argv[++i], nullptr, 10)));
    else if (arg == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
  }
  if (sizes.empty()) sizes = {1 << 10, 1 << 16, 1 << 20, 1 << 22, 1 << 24};
  int rc = 0;
  try {
    auto comm = monet::make_mpi_communicator();
    const int P = comm->size();
    if (comm->rank() == 0)
      std::printf("%-12s %10s %12s %14s %14s %16s %8s\n", "floats", "MB", "time (ms)", "algo (GB/s)", "bus (GB/s)",
                  "memcpy (GB/s)", "bus/cpy");
    for (size_t n : sizes) {
      std::vector<float> buf(n, 1.0f);
      double best = 1e30;
      for (int r = 0; r < reps; r++) {
        comm->barrier();
        const auto t0 = std::chrono::steady_clock::now();
        comm->all_reduce_sum(buf.data(), buf.size());
        best = std::min(best, seconds_since(t0));
      }
      const double bytes = double(n) * sizeof(float);
      if (comm->rank() == 0) {
        const double cpy = bytes / best_memcpy_seconds(size_t(bytes), reps) / 1e9;
        const double bus = 2.0 * (P - 1) / P * bytes / best / 1e9;
        std::printf("%-12zu %10.2f %12.3f %14.2f %14.2f %16.2f %8.2f\n", n, bytes / 1e6, best * 1e3,
                    bytes / best / 1e9, bus, cpy, bus / cpy);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "monet_allreduce_bench: %s\n", e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
