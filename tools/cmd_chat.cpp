// monet chat --model DIR [--system TEXT] [--template NAME] [sampling options]
// Interactive multi-turn chat; the KV cache carries the conversation, so each
// turn only processes its new tokens. Ctrl-D ends it. With --image (VisionMonet),
// the first message starts with one <image> per image (unless it places its
// own), as LLaVA's CLI does.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.h"
#include "commands.h"
#include "monet/chat.h"
#include "monet/error.h"
#include "monet/generate.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"
#include "vision_cli.h"

namespace {

// The next non-empty line of the user's input (a "> " prompt first when
// interactive); false at the end of the input.
bool read_user_line(bool interactive, std::string& line) {
  while (true) {
    if (interactive) {
      std::printf("> ");
      std::fflush(stdout);
    }
    if (!std::getline(std::cin, line)) return false;
    if (!line.empty()) return true;
  }
}

std::vector<monet::ChatMessage> read_conversation(const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(monet::read_file(path));
  } catch (const nlohmann::json::exception& e) {
    monet::fail(path, ": not valid JSON (", e.what(), ")");
  }
  std::vector<monet::ChatMessage> msgs;
  if (!j.is_array()) monet::fail(path, ": expected a JSON array of {\"role\", \"content\"} messages");
  for (const auto& m : j) {
    if (!m.is_object() || !m.contains("role") || !m.contains("content") || !m["role"].is_string() ||
        !m["content"].is_string())
      monet::fail(path, ": each message needs string \"role\" and \"content\"");
    msgs.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  return msgs;
}

void print_text(const std::string& text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// ChatSession's loop for prompts with images: the conversation is rendered
// with the chat template, split at its <image> placeholders, and the cache
// is reused for the positions (text tokens and image patches) that did not
// change since the last turn.
void chat_with_images(const monet::Model& model, const monet::Tokenizer& tok, monet::ChatFormat format,
                      std::vector<monet::ChatMessage> msgs, monet::GenerateOptions go, const VisionArgs& vision,
                      bool interactive) {
  const LoadedImages li = load_images(model, vision);
  go.stop_ids = monet::chat_stop_ids(model.config(), tok, format);
  monet::KvCache cache = model.new_cache(0);
  std::vector<int32_t> cached;  // what the cache holds, per position (kImageToken for image patches)
  if (interactive)
    std::fprintf(stderr, "monet chat: %s, %s template, %zu image(s). Ctrl-D to quit.\n", model.dir().c_str(),
                 monet::chat_format_name(format), li.embeds.size());
  std::string line;
  bool first = true;
  while (read_user_line(interactive, line)) {
    msgs.push_back({"user", first ? monet::with_image_placeholders(line, li.embeds.size()) : line});
    first = false;
    const std::string text = monet::render_chat_prompt(tok, format, msgs, true);
    const monet::MultimodalPrompt mp = monet::build_multimodal_prompt(
        model, monet::tokenize_with_images(tok, text, false), li.embeds, li.tower->tokens_per_image());
    size_t common = 0;
    while (common < cached.size() && common < mp.ids.size() && cached[common] == mp.ids[common]) common++;
    if (common == mp.ids.size()) common--;  // the last position is fed again for its logits
    cache.length = int64_t(common);
    const int32_t last = monet::prefill_multimodal_prompt(model, cache, mp, int64_t(common), go.mask);
    const monet::GenerateResult r = monet::generate_text(model, tok, cache, {last}, go, [](const std::string& t) {
      print_text(t);
      return true;
    });
    std::printf("\n");
    std::fflush(stdout);
    std::fprintf(stderr, "[%lld new prompt positions (%zu reused), %lld generated, %.1f tokens/s]\n",
                 (long long)(mp.size() - int64_t(common)), common, (long long)r.stats.generated_tokens,
                 r.stats.generated_tokens / std::max(r.stats.generate_seconds, 1e-9));
    cached = mp.ids;
    cached.insert(cached.end(), r.ids.begin(), r.ids.end());
    cached.resize(size_t(cache.length));
    msgs.push_back({"assistant", r.text});
  }
  if (interactive) std::printf("\n");
}

}  // namespace

void add_chat_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("chat", "Chat with a checkpoint in the terminal (Ctrl-D to quit)");
  static std::string model_dir, system_prompt, template_name, render_path, mask_path;
  static int64_t max_tokens = 256;
  static DeviceArgs device;
  static bool generation_prompt = false;
  static monet::SamplingParams sampling;
  static VisionArgs vision;
  add_model_option(cmd, model_dir);
  cmd->add_option("--system", system_prompt, "system message");
  cmd->add_option("--template", template_name,
                  "chat format: llama2, mistral or chatml (default: read from tokenizer_config.json)");
  cmd->add_option("-n,--max-tokens", max_tokens, "maximum tokens per reply");
  cmd->add_option("--temperature", sampling.temperature, "sampling temperature; 0 = greedy");
  cmd->add_option("--top-k", sampling.top_k, "keep the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", sampling.top_p, "nucleus sampling threshold (1 = off)");
  cmd->add_option("--min-p", sampling.min_p, "min-p filter (0 = off)");
  cmd->add_option("--repeat-penalty", sampling.repeat_penalty, "penalty for recent tokens (1 = off)");
  cmd->add_option("--seed", sampling.seed, "random seed");
  add_device_options(cmd, device);
  cmd->add_option("--mask", mask_path, "JSON file of experts to remove");
  cmd->add_option("--render", render_path,
                  "print the prompt of a JSON conversation [{\"role\", \"content\"}, ...] and its ids, then exit");
  cmd->add_flag("--add-generation-prompt", generation_prompt, "with --render: end with the assistant's turn opener");
  add_vision_options(cmd, vision);
  cmd->callback([] {
    auto tok = monet::Tokenizer::load_dir(model_dir);
    const monet::ChatFormat format = template_name.empty() ? monet::detect_chat_format(tok->chat_template())
                                                           : monet::chat_format_from_name(template_name);
    if (!render_path.empty()) {
      const std::string text = monet::render_chat_prompt(*tok, format, read_conversation(render_path), generation_prompt);
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::printf("\n");
      const auto ids = tok->encode_with_specials(text);
      for (size_t i = 0; i < ids.size(); i++) std::printf("%s%d", i ? "," : "", ids[i]);
      std::printf("\n");
      return;
    }
    auto model = monet::Model::load(model_dir, device.load_options());
    const monet::MonetConfig& c = model->config();
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!mask_path.empty()) mask = monet::ExpertMask::load_json(mask_path, c);
    monet::GenerateOptions go;
    go.max_tokens = max_tokens;
    go.sampling = sampling;
    go.mask = &mask;

    const bool interactive = isatty(STDIN_FILENO);
    std::vector<monet::ChatMessage> system;
    if (!system_prompt.empty()) system.push_back({"system", system_prompt});
    if (!vision.images.empty()) {
      chat_with_images(*model, *tok, format, system, go, vision, interactive);
      return;
    }
    monet::ChatSession chat(*model, *tok, format, system);
    if (interactive)
      std::fprintf(stderr, "monet chat: %s, %s template. Ctrl-D to quit.\n", model_dir.c_str(), monet::chat_format_name(format));
    std::string line;
    while (read_user_line(interactive, line)) {
      int64_t reused = 0;
      const monet::GenerateResult r = chat.reply(line, go, [](const std::string& text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
        return true;
      }, &reused);
      std::printf("\n");
      std::fflush(stdout);
      std::fprintf(stderr, "[%lld new prompt tokens (%lld reused), %lld generated, %.1f tokens/s]\n",
                   (long long)r.stats.prompt_tokens, (long long)reused, (long long)r.stats.generated_tokens,
                   r.stats.generated_tokens / std::max(r.stats.generate_seconds, 1e-9));
    }
    if (interactive) std::printf("\n");
  });
}
