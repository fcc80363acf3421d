// monet generate --model DIR (-p TEXT | --ids 1,5,9) [--image FILE...] [sampling options]
// Streams the continuation to stdout; timing to stderr.
#include <chrono>
#include <cstdio>

#include "cli_util.h"
#include "commands.h"
#include "monet/error.h"
#include "monet/generate.h"
#include "monet/mask.h"
#include "monet/model.h"
#include "monet/tokenizer.h"
#include "vision_cli.h"

namespace {

struct GenerateArgs {
  std::string model_dir, prompt, ids_text, mask_path;
  std::vector<std::string> stops;
  int64_t max_tokens = 128;
  DeviceArgs device;
  bool print_ids = false;
  monet::SamplingParams sampling;
  VisionArgs vision;
};

}  // namespace

void add_generate_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt, streaming it to stdout");
  static GenerateArgs a;
  add_model_option(cmd, a.model_dir);
  auto* p = cmd->add_option("-p,--prompt", a.prompt, "prompt text");
  auto* ids = cmd->add_option("--ids", a.ids_text, "prompt as comma-separated token ids instead of text");
  p->excludes(ids);
  cmd->add_option("-n,--max-tokens", a.max_tokens, "maximum number of tokens to generate")->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", a.sampling.temperature, "sampling temperature; 0 = greedy");
  cmd->add_option("--top-k", a.sampling.top_k, "keep the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", a.sampling.top_p, "nucleus sampling threshold (1 = off)");
  cmd->add_option("--min-p", a.sampling.min_p, "drop tokens below min_p x the top probability (0 = off)");
  cmd->add_option("--repeat-penalty", a.sampling.repeat_penalty, "penalty for recently seen tokens (1 = off)");
  cmd->add_option("--repeat-last-n", a.sampling.repeat_last_n, "how many recent tokens the penalty considers");
  cmd->add_option("--seed", a.sampling.seed, "random seed (same seed = same output)");
  cmd->add_option("--stop", a.stops, "stop when this string is generated (repeatable)");
  add_device_options(cmd, a.device);
  cmd->add_option("--mask", a.mask_path, "JSON file of experts to remove");
  cmd->add_flag("--print-ids", a.print_ids, "print the generated token ids, comma-separated, on one line");
  add_vision_options(cmd, a.vision);
  cmd->callback([] {
    if (a.prompt.empty() && a.ids_text.empty()) monet::fail("generate: give a prompt with -p TEXT or --ids 1,5,9");
    monet::StopMatcher check_stops(a.stops);  // an empty stop string is refused before loading
    auto model = monet::Model::load(a.model_dir, a.device.load_options());
    const monet::MonetConfig& c = model->config();
    std::unique_ptr<monet::Tokenizer> tok;
    std::vector<int32_t> prompt;
    const bool with_images = !a.vision.images.empty();
    if (!a.ids_text.empty()) {
      prompt = with_images ? parse_ids_with_images(a.ids_text) : parse_id_list(a.ids_text);
    } else {
      tok = monet::Tokenizer::load_dir(a.model_dir);
      // With images, the text between <image> placeholders is tokenized chunk by chunk, as LLaVA does.
      prompt = with_images ? monet::tokenize_with_images(
                                 *tok, monet::with_image_placeholders(a.prompt, a.vision.images.size()))
                           : tok->encode(a.prompt, true);
    }
    if (!tok && !a.print_ids) {
      try {
        tok = monet::Tokenizer::load_dir(a.model_dir);
      } catch (const monet::Error& e) {
        std::fprintf(stderr, "no tokenizer (%s): printing token ids\n", e.what());
        a.print_ids = true;
      }
    }
    monet::ExpertMask mask = monet::ExpertMask::none(c);
    if (!a.mask_path.empty()) mask = monet::ExpertMask::load_json(a.mask_path, c);

    monet::GenerateOptions go;
    go.max_tokens = a.max_tokens;
    go.sampling = a.sampling;
    go.stop_ids.assign(c.eos_token_ids.begin(), c.eos_token_ids.end());
    go.mask = &mask;
    // With images: the prompt's text and image embeddings fill the cache up
    // to its last token, from which generation continues.
    int64_t prompt_size = int64_t(prompt.size());
    double prefill_seconds = 0;
    monet::KvCache cache;
    if (with_images) {
      const LoadedImages li = load_images(*model, a.vision);
      const monet::MultimodalPrompt mp =
          monet::build_multimodal_prompt(*model, prompt, li.embeds, li.tower->tokens_per_image());
      prompt_size = mp.size();
      cache = model->new_cache(prompt_size + a.max_tokens);
      const auto t0 = std::chrono::steady_clock::now();
      prompt = {monet::prefill_multimodal_prompt(*model, cache, mp, 0, &mask)};
      prefill_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } else {
      cache = model->new_cache(prompt_size + a.max_tokens);
    }
    if (!a.stops.empty() && !tok) monet::fail("generate: --stop needs the tokenizer files in ", a.model_dir);
    monet::GenerateStats stats;
    if (a.print_ids || !tok) {
      const std::vector<int32_t> out = monet::generate(*model, cache, prompt, go, [](int32_t) { return true; }, &stats);
      for (size_t i = 0; i < out.size(); i++) std::printf("%s%d", i ? "," : "", out[i]);
      std::printf("\n");
    } else {
      go.stop_strings = a.stops;
      stats = monet::generate_text(*model, *tok, cache, prompt, go, [](const std::string& text) {
                std::fwrite(text.data(), 1, text.size(), stdout);
                std::fflush(stdout);
                return true;
              }).stats;
      std::printf("\n");
    }
    std::fflush(stdout);
    if (stats.hit_context_end)
      std::fprintf(stderr, "stopped at the end of the context (max_position_embeddings = %lld)\n",
                   (long long)c.max_position_embeddings);
    std::fprintf(stderr, "prompt: %lld tokens, %.1f tokens/s | generated: %lld tokens, %.2f tokens/s\n",
                 (long long)prompt_size, prompt_size / std::max(stats.prompt_seconds + prefill_seconds, 1e-9),
                 (long long)stats.generated_tokens,
                 stats.generated_tokens / std::max(stats.generate_seconds, 1e-9));
  });
}
