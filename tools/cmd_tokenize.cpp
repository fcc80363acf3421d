// monet tokenize --model DIR --text "..." [--pieces] [--no-special]
//                 [--file PATH] [--decode IDS|@PATH] [--jsonl]
// monet tokenize --model DIR --save-json PATH   (tokenizer.json of DIR/tokenizer.model)
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"

namespace {

void print_ids(const std::vector<int32_t>& ids) {
  std::string line;
  for (size_t i = 0; i < ids.size(); i++) line += (i ? "," : "") + std::to_string(ids[i]);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
}

// --jsonl: one JSON string per line in, one line of ids per line out (many
// texts for one load of the tokenizer).
void encode_jsonl(const monet::Tokenizer& tok, const std::string& path, bool add_special) {
  std::istringstream in(monet::read_file(path));
  std::string line;
  for (size_t n = 1; std::getline(in, line); n++) {
    nlohmann::json text;
    try {
      text = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      monet::fail(path, ":", n, ": not a JSON string (", e.what(), ")");
    }
    if (!text.is_string()) monet::fail(path, ":", n, ": not a JSON string");
    print_ids(tok.encode(text.get<std::string>(), add_special));
  }
}

// --decode @PATH --jsonl: one id list per line in, one JSON string per line out.
void decode_jsonl(const monet::Tokenizer& tok, const std::string& path, bool skip_special) {
  std::istringstream in(monet::read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    const std::vector<int32_t> ids = line.empty() ? std::vector<int32_t>{} : parse_id_list(line);
    const std::string out = nlohmann::json(tok.decode(ids, skip_special)).dump() + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Print the token ids of a text (as HF tokenizer(text).input_ids)");
  static std::string model_dir, text, file, decode_ids, save_json;
  static bool pieces = false, no_special = false, jsonl = false;
  add_model_option(cmd, model_dir, "checkpoint or tokenizer directory");
  auto* t = cmd->add_option("--text", text, "text to tokenize");
  auto* f = cmd->add_option("--file", file, "tokenize the contents of this file instead")->excludes(t);
  cmd->add_option("--decode", decode_ids,
                  "print the text of these comma-separated ids instead (@PATH reads them from a file)")
      ->excludes(t)
      ->excludes(f);
  cmd->add_option("--save-json", save_json,
                  "write the tokenizer.json that transformers makes of DIR/tokenizer.model to this path, "
                  "and nothing else")
      ->excludes(t)
      ->excludes(f);
  cmd->add_flag("--pieces", pieces, "also print each token's vocabulary entry, one per line (id<TAB>piece)");
  cmd->add_flag("--no-special", no_special, "do not add BOS/EOS (with --decode: keep special tokens)");
  cmd->add_flag("--jsonl", jsonl,
                "--file holds one JSON string per line: print one line of ids for each; "
                "--decode @PATH holds one id list per line: print each text as a JSON string");
  cmd->callback([t, f] {
    if (!save_json.empty()) {
      const std::string model_path = model_dir + "/tokenizer.model";
      return monet::write_file_atomic(save_json, monet::sentencepiece_to_tokenizer_json(model_path));
    }
    if (t->count() == 0 && f->count() == 0 && decode_ids.empty())
      monet::fail("tokenize: give --text TEXT, --file PATH or --decode IDS");
    if (jsonl && (t->count() > 0 || pieces || (!decode_ids.empty() && decode_ids[0] != '@')))
      monet::fail("tokenize: --jsonl goes with --file PATH or --decode @PATH (and without --pieces)");
    auto tok = monet::Tokenizer::load_dir(model_dir);
    if (!decode_ids.empty()) {
      if (jsonl) return decode_jsonl(*tok, decode_ids.substr(1), !no_special);
      if (decode_ids[0] == '@') {
        decode_ids = monet::read_file(decode_ids.substr(1));
        while (!decode_ids.empty() && (decode_ids.back() == '\n' || decode_ids.back() == ' ')) decode_ids.pop_back();
      }
      const std::vector<int32_t> ids = decode_ids.empty() ? std::vector<int32_t>{} : parse_id_list(decode_ids);
      const std::string out = tok->decode(ids, !no_special);
      std::fwrite(out.data(), 1, out.size(), stdout);
      return;
    }
    if (jsonl) return encode_jsonl(*tok, file, !no_special);
    if (!file.empty()) text = monet::read_file(file);
    const std::vector<int32_t> ids = tok->encode(text, !no_special);
    print_ids(ids);
    if (pieces)
      for (int32_t id : ids) {
        const std::string line = std::to_string(id) + "\t" + tok->piece(id) + "\n";
        std::fwrite(line.data(), 1, line.size(), stdout);
      }
  });
}
