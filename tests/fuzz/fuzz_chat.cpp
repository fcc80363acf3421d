// Chat templates: detect_chat_format of a chat_template, chat_format_from_name,
// and render_chat of any conversation in every format.
// Input: template NUL role NUL content NUL role NUL content ...
#include "fuzz_util.h"
#include "monet/chat.h"
#include "monet/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> parts = monet_fuzz::split(data, size, 33);
  try {
    const monet::ChatFormat f = monet::detect_chat_format(parts[0]);
    FUZZ_CHECK(monet::chat_format_from_name(monet::chat_format_name(f)) == f);
  } catch (const monet::Error&) {
  }
  try {
    (void)monet::chat_format_from_name(parts[0]);
  } catch (const monet::Error&) {
  }
  std::vector<monet::ChatMessage> msgs;
  for (size_t k = 1; k + 1 < parts.size(); k += 2)
    if (!parts[k].empty() || !parts[k + 1].empty()) msgs.push_back({parts[k], parts[k + 1]});
  size_t content = 0;
  for (const auto& m : msgs) content += m.role.size() + m.content.size();
  for (monet::ChatFormat f : {monet::ChatFormat::Llama2, monet::ChatFormat::Mistral, monet::ChatFormat::ChatML})
    for (bool generation_prompt : {false, true}) {
      try {
        const std::string out = monet::render_chat(f, msgs, generation_prompt, "<s>", "</s>");
        FUZZ_CHECK(out.size() <= 64 + content + 64 * msgs.size());  // a bounded rendering
      } catch (const monet::Error&) {
      }
    }
  return 0;
}
