// The MPI communicator (built when CMake finds MPI: MONET_MPI=1). Each
// collective is one MPI call on a duplicate of MPI_COMM_WORLD; an MPI error
// becomes a monet::Error (the communicator sets MPI_ERRORS_RETURN on its own
// communicator only).
#include "monet/comm.h"
#include "monet/error.h"

#if MONET_MPI
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>

namespace monet {
namespace {

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      fail("MPI communicator: MPI is not initialised (the front end calls MPI_Init before using it)");
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void all_reduce_sum(float* data, size_t n) override { all_reduce(data, n, MPI_FLOAT, sizeof(float)); }
  void all_reduce_sum(double* data, size_t n) override { all_reduce(data, n, MPI_DOUBLE, sizeof(double)); }
  void all_reduce_sum(int64_t* data, size_t n) override { all_reduce(data, n, MPI_INT64_T, sizeof(int64_t)); }
  void reduce_scatter_sum(const float* in, float* out, size_t n) override {
    reduce_scatter(in, out, n, MPI_FLOAT, sizeof(float));
  }
  void reduce_scatter_sum(const double* in, double* out, size_t n) override {
    reduce_scatter(in, out, n, MPI_DOUBLE, sizeof(double));
  }
  void all_gather(const void* in, void* out, size_t bytes) override {
    const auto t0 = now();
    check(MPI_Allgather(in, count(bytes), MPI_BYTE, out, count(bytes), MPI_BYTE, comm_), "MPI_Allgather");
    account(bytes, t0);
  }
  std::vector<std::vector<uint8_t>> gather(const std::vector<uint8_t>& mine, int root) override {
    check_root(root);
    const auto t0 = now();
    const int n = count(mine.size());
    std::vector<int> sizes(rank_ == root ? size_t(size_) : 0), offsets(sizes.size());
    check(MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, root, comm_), "MPI_Gather");
    std::vector<uint8_t> all;
    if (rank_ == root) {
      int64_t total = 0;
      for (int r = 0; r < size_; r++) {
        offsets[size_t(r)] = count(size_t(total));
        total += sizes[size_t(r)];
      }
      all.resize(size_t(total));
      count(size_t(total));  // the offsets are ints: the whole gather must fit
    }
    check(MPI_Gatherv(mine.data(), n, MPI_BYTE, all.data(), sizes.data(), offsets.data(), MPI_BYTE, root, comm_),
          "MPI_Gatherv");
    account(mine.size(), t0);
    std::vector<std::vector<uint8_t>> out;
    for (size_t r = 0; r < sizes.size(); r++)
      out.emplace_back(all.begin() + offsets[r], all.begin() + offsets[r] + sizes[r]);
    return out;
  }
  void broadcast(void* data, size_t bytes, int root) override {
    check_root(root);
    const auto t0 = now();
    uint8_t* p = static_cast<uint8_t*>(data);
    for (size_t done = 0; done < bytes;) {  // in pieces below INT_MAX bytes
      const size_t piece = std::min<size_t>(bytes - done, size_t(1) << 30);
      check(MPI_Bcast(p + done, int(piece), MPI_BYTE, root, comm_), "MPI_Bcast");
      done += piece;
    }
    account(bytes, t0);
  }
  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }

 private:
  using Clock = std::chrono::steady_clock;
  static Clock::time_point now() { return Clock::now(); }
  void account(size_t bytes, Clock::time_point t0) {
    stats_.calls++;
    stats_.bytes += int64_t(bytes);
    stats_.seconds += std::chrono::duration<double>(now() - t0).count();
  }
  static int count(size_t n) {
    if (n > size_t(INT_MAX)) fail("MPI communicator: a message of ", n, " elements exceeds MPI's int count");
    return int(n);
  }
  void check_root(int root) const {
    if (root < 0 || root >= size_) fail("MPI communicator: root rank ", root, " is outside [0, ", size_, ")");
  }
  static void check(int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    fail(what, " failed: ", std::string(text, size_t(len)));
  }
  // In pieces of at most 2^28 elements (MPI counts are ints).
  void all_reduce(void* data, size_t n, MPI_Datatype type, size_t elem) {
    const auto t0 = now();
    uint8_t* p = static_cast<uint8_t*>(data);
    for (size_t done = 0; done < n;) {
      const size_t piece = std::min<size_t>(n - done, size_t(1) << 28);
      check(MPI_Allreduce(MPI_IN_PLACE, p + done * elem, int(piece), type, MPI_SUM, comm_), "MPI_Allreduce");
      done += piece;
    }
    account(n * elem, t0);
  }
  void reduce_scatter(const void* in, void* out, size_t n, MPI_Datatype type, size_t elem) {
    const auto t0 = now();
    check(MPI_Reduce_scatter_block(in, out, count(n), type, MPI_SUM, comm_), "MPI_Reduce_scatter_block");
    account(n * size_t(size_) * elem, t0);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool mpi_available() { return true; }
std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

}  // namespace monet

#else  // built without MPI

namespace monet {
bool mpi_available() { return false; }
std::unique_ptr<Communicator> make_mpi_communicator() {
  fail("this monet was built without MPI (install libopenmpi-dev and configure again: CMake's find_package(MPI))");
}
}  // namespace monet

#endif
