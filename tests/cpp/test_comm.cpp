// The single-process communicator: every collective is the identity (or a
// copy), roots other than 0 are refused, and the MPI one refuses to start
// without MPI_Init (the front end's job). The MPI implementation itself is
// tested through `mpirun -np 2 monet` (tests/python/test_distributed.py).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "monet/comm.h"
#include "monet/error.h"

TEST(Communicator, SingleProcessCollectives) {
  auto comm = monet::make_single_communicator();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  EXPECT_EQ(comm->name(), "single");
  std::vector<float> f{1.5f, -2.0f};
  std::vector<double> d{3.25};
  std::vector<int64_t> i{7, 8, 9};
  comm->all_reduce_sum(f.data(), f.size());
  comm->all_reduce_sum(d.data(), d.size());
  comm->all_reduce_sum(i.data(), i.size());
  EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(d, (std::vector<double>{3.25}));
  EXPECT_EQ(i, (std::vector<int64_t>{7, 8, 9}));
  std::vector<float> out(2);
  comm->reduce_scatter_sum(f.data(), out.data(), 2);
  EXPECT_EQ(out, f);
  std::vector<int64_t> gathered(3);
  comm->all_gather(i.data(), gathered.data(), 3 * sizeof(int64_t));
  EXPECT_EQ(gathered, i);
  const std::vector<uint8_t> mine{1, 2, 3};
  const auto parts = comm->gather(mine, 0);
  ASSERT_EQ(parts.size(), 1u);
  EXPECT_EQ(parts[0], mine);
  EXPECT_EQ(monet::broadcast_string(*comm, "settings", 0), "settings");
  comm->barrier();
  EXPECT_THROW(comm->broadcast(d.data(), sizeof(double), 1), monet::Error);
  EXPECT_THROW(comm->gather(mine, 2), monet::Error);
}

TEST(Communicator, MpiNeedsMpiInit) {
  // Built with MPI: refuses before MPI_Init; without: says it was built without.
  try {
    monet::make_mpi_communicator();
    FAIL() << "an MPI communicator without MPI_Init";
  } catch (const monet::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(monet::mpi_available() ? "not initialised" : "built without MPI"), std::string::npos) << what;
  }
}
