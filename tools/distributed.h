// The process's place in a distributed run (docs/distributed.md). The front
// end owns MPI: main() calls distributed_init before parsing and
// distributed_finalize at the end; an error on any rank ends every rank
// (distributed_abort) after that rank has printed it.
#pragma once
#include "monet/comm.h"

// Starts MPI when a launcher (mpirun, srun) started this process and the
// build has MPI; refuses (monet::Error) a multi-process launch without MPI.
void distributed_init(int* argc, char*** argv);
// The communicator of this run: MPI's world under a launcher, else one process.
monet::Communicator& world();
// "" single-process; "rank 1 of 2: " in a distributed run (error messages).
const char* rank_prefix();
// Ends all ranks (MPI_Abort) in a multi-process run; returns otherwise.
void distributed_abort(int code);
void distributed_finalize();
