// monet — command-line front end over the monet library.
#include <csignal>
#include <cstdio>
#include <exception>

#include "commands.h"
#include "distributed.h"
#include "monet/error.h"

int main(int argc, char** argv) {
  // A write past the file size limit (RLIMIT_FSIZE) then fails with EFBIG
  // and becomes a monet::Error that removes the temporary file, instead of
  // SIGXFSZ killing the process part-way through an output.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"monet: inference, interpretability and training for Monet models"};
  app.require_subcommand(1);
  add_info_command(app);
  add_forward_command(app);
  add_tokenize_command(app);
  add_generate_command(app);
  add_experts_command(app);
  add_chat_command(app);
  add_eval_loss_command(app);
  add_find_experts_command(app);
  add_index_command(app);
  add_serve_command(app);
  add_plot_loss_command(app);
  add_train_command(app);
  add_grad_command(app);
  add_vision_command(app);
  add_torch_convert_command(app);
  add_quantize_command(app);
  // Under mpirun/srun: MPI starts here; an error on any rank is printed by
  // that rank, then ends every rank (MPI_Abort), so that none waits forever
  // in a collective.
  int rc = 0;
  try {
    distributed_init(&argc, &argv);
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    rc = app.exit(e);
  } catch (const monet::Error& e) {
    std::fprintf(stderr, "monet: error: %s%s\n", rank_prefix(), e.what());
    rc = 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "monet: internal error: %s%s\n", rank_prefix(), e.what());
    rc = 2;
  }
  if (rc != 0) distributed_abort(rc);
  distributed_finalize();
  return rc;
}
