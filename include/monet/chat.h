// Chat templates: the prompt formats of chat checkpoints, rendered as
// transformers' apply_chat_template renders their Jinja templates.
#pragma once
#include <string>
#include <vector>

namespace monet {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

enum class ChatFormat {
  Llama2,   // <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nuser [/INST] answer </s>
  Mistral,  // <s>[INST] user [/INST]answer</s>   (no system role)
  ChatML,   // <|im_start|>role\ncontent<|im_end|>\n
};

// Recognises the family of a tokenizer_config.json chat_template; throws
// monet::Error for templates of other families.
ChatFormat detect_chat_format(const std::string& jinja_template);
ChatFormat chat_format_from_name(const std::string& name);  // "llama2", "mistral", "chatml"
const char* chat_format_name(ChatFormat f);

// The prompt text, special tokens spelled out (bos/eos strings).
std::string render_chat(ChatFormat f, const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                        const std::string& bos, const std::string& eos);

}  // namespace monet
