#include "monet/chat.h"

#include "monet/error.h"

namespace monet {
namespace {

// Jinja's str.strip(): Python whitespace at both ends.
std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

void check_alternation(const std::vector<ChatMessage>& msgs, size_t first) {
  for (size_t k = first; k < msgs.size(); k++) {
    const bool user_turn = (k - first) % 2 == 0;
    if ((msgs[k].role == "user") != user_turn)
      fail("chat: conversation roles must alternate user/assistant/user/assistant/...");
    if (msgs[k].role != "user" && msgs[k].role != "assistant")
      fail("chat: role \"", msgs[k].role, "\" is not supported by this template");
  }
}

}  // namespace

ChatFormat detect_chat_format(const std::string& t) {
  if (t.find("<|im_start|>") != std::string::npos) return ChatFormat::ChatML;
  if (t.find("[INST]") != std::string::npos)
    return t.find("<<SYS>>") != std::string::npos ? ChatFormat::Llama2 : ChatFormat::Mistral;
  if (t.empty()) fail("chat: the checkpoint has no chat_template in tokenizer_config.json; choose one with --template llama2|mistral|chatml");
  fail("chat: this chat_template is not one monet can render (supported: the LLaMA-2/Mistral [INST] family and ChatML); "
       "choose a format with --template llama2|mistral|chatml");
}

ChatFormat chat_format_from_name(const std::string& name) {
  if (name == "llama2") return ChatFormat::Llama2;
  if (name == "mistral") return ChatFormat::Mistral;
  if (name == "chatml") return ChatFormat::ChatML;
  fail("--template: unknown chat format \"", name, "\" (expected llama2, mistral or chatml)");
}

const char* chat_format_name(ChatFormat f) {
  switch (f) {
    case ChatFormat::Llama2: return "llama2";
    case ChatFormat::Mistral: return "mistral";
    default: return "chatml";
  }
}

std::string render_chat(ChatFormat f, const std::vector<ChatMessage>& msgs, bool add_generation_prompt,
                        const std::string& bos, const std::string& eos) {
  std::string out;
  switch (f) {
    case ChatFormat::ChatML:
      for (const ChatMessage& m : msgs) out.append("<|im_start|>").append(m.role).append("\n").append(m.content).append("<|im_end|>\n");
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    case ChatFormat::Llama2: {
      const bool has_system = !msgs.empty() && msgs[0].role == "system";
      check_alternation(msgs, has_system ? 1 : 0);
      for (size_t k = has_system ? 1 : 0; k < msgs.size(); k++) {
        std::string content;
        if (has_system && k == 1) content.append("<<SYS>>\n").append(msgs[0].content).append("\n<</SYS>>\n\n");
        content.append(msgs[k].content);
        if (msgs[k].role == "user")
          out.append(bos).append("[INST] ").append(strip(content)).append(" [/INST]");
        else
          out.append(" ").append(strip(content)).append(" ").append(eos);
      }
      return out;
    }
    case ChatFormat::Mistral:
      if (!msgs.empty() && msgs[0].role == "system")
        fail("chat: the Mistral [INST] template has no system role; drop --system or use --template llama2");
      check_alternation(msgs, 0);
      out = bos;
      for (const ChatMessage& m : msgs) {
        if (m.role == "user")
          out.append("[INST] ").append(m.content).append(" [/INST]");
        else
          out.append(m.content).append(eos);
      }
      return out;
  }
  return out;
}

}  // namespace monet
