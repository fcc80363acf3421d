// MPI lifetime for the `monet` command (see distributed.h).
#include "distributed.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "monet/error.h"

#if MONET_MPI
#include <mpi.h>
#endif

namespace {

std::unique_ptr<monet::Communicator> g_world;
#if MONET_MPI
bool g_mpi = false;  // this process called MPI_Init
#endif
std::string g_prefix;

#if !MONET_MPI
// The variables mpirun (OpenMPI), PMIx (srun --mpi=pmix) and PMI-1/2
// launchers (srun --mpi=pmi2, MPICH's hydra) set in every process they start.
int launcher_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_NTASKS"}) {
    const char* v = std::getenv(name);
    if (v && *v) return std::atoi(v);
  }
  return std::getenv("PMIX_RANK") ? 2 : 0;  // PMIx without a size: assume a job
}
#endif

bool launched() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK");
}

}  // namespace

void distributed_init(int* argc, char*** argv) {
#if MONET_MPI
  if (launched()) {
    int provided = 0;
    // FUNNELED: only the main thread calls MPI (OpenMP teams never do).
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      monet::fail("MPI_Init_thread failed");
    g_mpi = true;
    g_world = monet::make_mpi_communicator();
    if (g_world->size() > 1) {
      g_prefix = "rank " + std::to_string(g_world->rank()) + " of " + std::to_string(g_world->size()) + ": ";
      // Other commands would run N times side by side (and write the same outputs).
      std::string command;
      for (int i = 1; i < *argc && command.empty(); i++)
        if ((*argv)[i][0] != '-') command = (*argv)[i];
      if (command != "train" && command != "index")
        monet::fail("only `monet train` and `monet index` run on several processes; `monet ", command,
                    "` was started on ", g_world->size());
    }
    return;
  }
#else
  (void)argc;
  (void)argv;
  if (launched() && launcher_size() > 1)
    monet::fail("started by an MPI launcher with ", launcher_size(),
                " processes, but this monet was built without MPI (install libopenmpi-dev, then configure and build "
                "again); each process would run the whole job alone");
#endif
}

monet::Communicator& world() {
  if (!g_world) g_world = monet::make_single_communicator();
  return *g_world;
}

const char* rank_prefix() { return g_prefix.c_str(); }

void distributed_abort(int code) {
#if MONET_MPI
  if (g_mpi && g_world && g_world->size() > 1) {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
  }
#else
  (void)code;
#endif
}

void distributed_finalize() {
#if MONET_MPI
  if (g_mpi) {
    g_world.reset();
    MPI_Finalize();
    g_mpi = false;
  }
#endif
}
