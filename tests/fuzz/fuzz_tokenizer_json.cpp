// HF tokenizer.json (with tokenizer_config.json): load, encode, decode.
// Input: tokenizer.json NUL tokenizer_config.json NUL text (the config is
// left out when its part is empty).
#include "tokenizer_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> parts = monet_fuzz::split(data, size, 3);
  const auto& dir = monet_fuzz::scratch_dir();
  monet_fuzz::write_file(dir / "tokenizer.json", parts[0]);
  if (parts[1].empty())
    monet_fuzz::remove_file(dir / "tokenizer_config.json");
  else
    monet_fuzz::write_file(dir / "tokenizer_config.json", parts[1]);
  std::unique_ptr<monet::Tokenizer> tok;
  try {
    tok = monet::Tokenizer::load_dir(dir.string());
  } catch (const monet::Error&) {
    return 0;
  }
  monet_fuzz::exercise_tokenizer(*tok, parts[2]);
  return 0;
}
