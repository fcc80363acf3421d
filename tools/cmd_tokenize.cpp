// monet tokenize --model DIR --text "..." [--pieces] [--no-special]
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"

void add_tokenize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Print the token ids of a text (as HF tokenizer(text).input_ids)");
  static std::string model_dir, text, file, decode_ids;
  static bool pieces = false, no_special = false;
  cmd->add_option("--model", model_dir, "checkpoint or tokenizer directory")->required();
  auto* t = cmd->add_option("--text", text, "text to tokenize");
  auto* f = cmd->add_option("--file", file, "tokenize the contents of this file instead")->excludes(t);
  cmd->add_option("--decode", decode_ids,
                  "print the text of these comma-separated ids instead (@PATH reads them from a file)")
      ->excludes(t)
      ->excludes(f);
  cmd->add_flag("--pieces", pieces, "also print each token's vocabulary entry, one per line (id<TAB>piece)");
  cmd->add_flag("--no-special", no_special, "do not add BOS/EOS (with --decode: keep special tokens)");
  cmd->callback([t, f] {
    if (t->count() == 0 && f->count() == 0 && decode_ids.empty())
      monet::fail("tokenize: give --text TEXT, --file PATH or --decode IDS");
    auto tok = monet::Tokenizer::load_dir(model_dir);
    if (!decode_ids.empty()) {
      if (decode_ids[0] == '@') {
        decode_ids = monet::read_file(decode_ids.substr(1));
        while (!decode_ids.empty() && (decode_ids.back() == '\n' || decode_ids.back() == ' ')) decode_ids.pop_back();
      }
      const std::string out = tok->decode(parse_id_list(decode_ids), !no_special);
      std::fwrite(out.data(), 1, out.size(), stdout);
      return;
    }
    if (!file.empty()) {
      text = monet::read_file(file);
    }
    const std::vector<int32_t> ids = tok->encode(text, !no_special);
    for (size_t i = 0; i < ids.size(); i++) std::printf("%s%d", i ? "," : "", ids[i]);
    std::printf("\n");
    if (pieces)
      for (int32_t id : ids) std::printf("%d\t%s\n", id, tok->piece(id).c_str());
  });
}
