// Prompts with images, as LLaVA builds them: the text split at `<image>`,
// each chunk tokenized on its own, and each placeholder replaced by the
// image's projected patch features in the input embeddings.
#include "monet/error.h"
#include "monet/model.h"
#include "monet/tokenizer.h"
#include "monet/vision.h"

namespace monet {

std::vector<int32_t> tokenize_with_images(const Tokenizer& tok, const std::string& prompt, bool add_special) {
  std::vector<std::vector<int32_t>> chunks;
  for (size_t start = 0;;) {
    const size_t at = prompt.find(kImagePlaceholder, start);
    chunks.push_back(tok.encode(std::string_view(prompt).substr(start, at == std::string::npos ? std::string::npos : at - start),
                                add_special));
    if (at == std::string::npos) break;
    start = at + std::string(kImagePlaceholder).size();
  }
  // llava.mm_utils.tokenizer_image_token: when the first chunk starts with
  // BOS, it stays, and the BOS every later chunk was given is dropped.
  const bool bos_first = !chunks[0].empty() && chunks[0][0] == tok.bos_id();
  std::vector<int32_t> ids;
  for (size_t i = 0; i < chunks.size(); i++) {
    if (i > 0) ids.push_back(kImageToken);
    const std::vector<int32_t>& c = chunks[i];
    const size_t skip = i > 0 && bos_first && !c.empty() && c[0] == tok.bos_id() ? 1 : 0;
    ids.insert(ids.end(), c.begin() + std::ptrdiff_t(skip), c.end());
  }
  return ids;
}

std::string with_image_placeholders(const std::string& text, size_t n_images) {
  if (n_images == 0 || text.find(kImagePlaceholder) != std::string::npos) return text;
  std::string out;
  for (size_t i = 0; i < n_images; i++) out += std::string(kImagePlaceholder) + "\n";
  return out + text;
}

MultimodalPrompt build_multimodal_prompt(const Model& model, const std::vector<int32_t>& ids_with_markers,
                                         const std::vector<std::vector<float>>& images, int64_t tokens_per_image) {
  const int64_t d = model.config().hidden_size;
  MultimodalPrompt p;
  size_t next_image = 0;
  std::vector<int32_t> text;  // a run of text ids, embedded together
  auto flush_text = [&] {
    if (text.empty()) return;
    const size_t at = p.embeds.size();
    p.embeds.resize(at + text.size() * size_t(d));
    model.embed_tokens(text.data(), int64_t(text.size()), p.embeds.data() + at);
    text.clear();
  };
  for (const int32_t id : ids_with_markers) {
    if (id != kImageToken) {
      text.push_back(id);
      p.ids.push_back(id);
      p.image.push_back(-1);
      p.patch.push_back(-1);
      continue;
    }
    flush_text();
    if (next_image >= images.size())
      fail("the prompt has more ", kImagePlaceholder, " placeholders than the ", images.size(), " image(s) given");
    const std::vector<float>& e = images[next_image];
    if (int64_t(e.size()) != tokens_per_image * d)
      fail("image ", next_image, " has ", e.size(), " embedding values, expected ", tokens_per_image, " x ", d);
    p.embeds.insert(p.embeds.end(), e.begin(), e.end());
    for (int64_t k = 0; k < tokens_per_image; k++) {
      p.ids.push_back(kImageToken);
      p.image.push_back(int32_t(next_image));
      p.patch.push_back(int32_t(k));
    }
    next_image++;
  }
  flush_text();
  if (next_image != images.size())
    fail(images.size(), " image(s) given but the prompt has ", next_image, " ", kImagePlaceholder,
         " placeholder(s); put one where each image goes");
  return p;
}

}  // namespace monet

namespace monet {

int32_t prefill_multimodal_prompt(const Model& model, KvCache& cache, const MultimodalPrompt& prompt, int64_t from,
                                  const ExpertMask* mask) {
  const int64_t T = prompt.size(), d = model.config().hidden_size;
  if (T == 0) fail("the prompt is empty");
  if (prompt.ids.back() == kImageToken)
    fail("the prompt ends with an image: generation continues from text, so put some text after the last ",
         kImagePlaceholder);
  if (from < 0 || from > T - 1) fail("prefill_multimodal_prompt: start ", from, " outside the prompt of ", T);
  if (cache.length != from) fail("prefill_multimodal_prompt: the cache holds ", cache.length, " positions, expected ", from);
  if (from < T - 1) {
    std::vector<Sequence> seqs(1);
    seqs[0].cache = &cache;
    seqs[0].embeds = prompt.embeds.data() + from * d;
    seqs[0].n = T - 1 - from;
    seqs[0].logits = Logits::None;
    seqs[0].mask = mask;
    model.forward_batch(seqs);
  }
  return prompt.ids.back();
}

}  // namespace monet
