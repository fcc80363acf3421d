// The single-process communicator and helpers over any communicator.
#include <cstring>

#include "monet/comm.h"
#include "monet/error.h"

namespace monet {
namespace {

class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "single"; }
  void all_reduce_sum(float*, size_t) override {}
  void all_reduce_sum(double*, size_t) override {}
  void all_reduce_sum(int64_t*, size_t) override {}
  void reduce_scatter_sum(const float* in, float* out, size_t n) override { copy(in, out, n * sizeof(float)); }
  void reduce_scatter_sum(const double* in, double* out, size_t n) override { copy(in, out, n * sizeof(double)); }
  void all_gather(const void* in, void* out, size_t bytes) override { copy(in, out, bytes); }
  std::vector<std::vector<uint8_t>> gather(const std::vector<uint8_t>& mine, int root) override {
    check_root(root);
    return {mine};
  }
  void broadcast(void*, size_t, int root) override { check_root(root); }
  void barrier() override {}

 private:
  static void copy(const void* in, void* out, size_t bytes) {
    if (in != out && bytes > 0) std::memmove(out, in, bytes);
  }
  static void check_root(int root) {
    if (root != 0) fail("communicator: root rank ", root, " does not exist (1 process)");
  }
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

std::string broadcast_string(Communicator& comm, const std::string& text, int root) {
  int64_t n = int64_t(text.size());
  comm.broadcast(&n, sizeof n, root);
  std::string out = comm.rank() == root ? text : std::string(size_t(n), '\0');
  if (n > 0) comm.broadcast(out.data(), size_t(n), root);
  return out;
}

}  // namespace monet
