// LLaVA-style vision for Monet (VisionMonet, model_type "llava_monet"): a
// CLIP ViT vision tower, the feature selection of LLaVA (a hidden state of
// the encoder, CLS dropped) and the mm_projector, on the model's backend;
// and the prompts in which an `<image>` placeholder stands for the projected
// patch features of an image.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "monet/image.h"
#include "monet/tensor.h"

namespace monet {

class Backend;
class Model;
class Tokenizer;
struct KvCache;
struct ExpertMask;

// A CLIP vision transformer's config (HF CLIPVisionConfig).
struct ClipVisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t image_size = 224;
  int64_t patch_size = 16;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";  // or "gelu"

  int64_t grid() const { return image_size / patch_size; }          // patches per side
  int64_t num_patches() const { return grid() * grid(); }
};

// The llava_monet fields of config.json that the vision side reads.
struct LlavaConfig {
  std::string vision_tower;             // mm_vision_tower: a HF name or a directory
  int64_t mm_hidden_size = 0;
  std::string projector_type = "linear";  // mm_projector_type: linear, mlp{N}x_gelu, identity
  int64_t select_layer = -2;            // mm_vision_select_layer (index into the L+1 hidden states)
  std::string select_feature = "patch"; // mm_vision_select_feature: patch (CLS dropped) or cls_patch
  std::string image_aspect_ratio = "square";  // pad, or square/absent: the processor alone
};

// Whether config.json describes a LLaVA-style model (mm_vision_tower set).
bool is_llava_config(const std::string& config_json_path);
LlavaConfig load_llava_config(const std::string& config_json_path);

struct VisionLoadOptions {
  std::string vision_tower_dir;  // --vision-tower: a CLIPVisionModel (or CLIPModel) directory
  std::string projector_file;    // a projector to use instead of the checkpoint's (.safetensors or torch .bin)
};

// The vision tower and projector of a llava_monet checkpoint, on a backend.
class VisionTower {
 public:
  // Reads config.json of `model_dir`; the CLIP config from the tower
  // directory (--vision-tower, or mm_vision_tower when it is a directory,
  // absolute or relative to model_dir) or, for openai/clip-vit-* names, the
  // known configs; the tower's weights from model_dir's safetensors (any
  // prefix ending in vision_model., found by name) or the tower directory;
  // the projector from model_dir's safetensors (*mm_projector.*), else
  // mm_projector.bin. `hidden_size` is the language model's (the projector's
  // output). monet::Error naming what is missing and what was found.
  static std::unique_ptr<VisionTower> load(const std::string& model_dir, int64_t hidden_size, Backend& backend,
                                           const VisionLoadOptions& opts = {});
  ~VisionTower();

  const ClipVisionConfig& clip() const { return clip_; }
  const LlavaConfig& llava() const { return llava_; }
  const ClipPreprocess& preprocess() const { return preprocess_; }
  int64_t tokens_per_image() const;  // patches (+1 for cls_patch)
  int64_t output_size() const { return hidden_size_; }
  std::string describe() const;      // one line: where the tower and projector came from

  // pixel_values [B, 3, S, S] -> the selected hidden state [B, tokens_per_image, mm_hidden] (host memory).
  std::vector<float> encode(const float* pixels, int64_t batch) const;
  // features [n, mm_hidden] -> [n, hidden_size] through the projector.
  std::vector<float> project(const float* features, int64_t n) const;
  // An image -> its input embeddings [tokens_per_image, hidden_size]: preprocess, encode, project.
  std::vector<float> embed_image(const Image& image) const;

 private:
  struct Layer {
    Weight ln1_w, ln1_b, ln2_w, ln2_b;
    Weight wq, bq, wk, bk, wv, bv, wo, bo;
    Weight fc1, fc1_b, fc2, fc2_b;
  };
  struct ProjectorLayer {
    bool gelu = false;
    Weight w, b;
  };
  VisionTower() = default;

  Backend* backend_ = nullptr;
  ClipVisionConfig clip_;
  LlavaConfig llava_;
  ClipPreprocess preprocess_;
  int64_t hidden_size_ = 0;
  Weight patch_embed;  // [D, 3 * p * p]
  Buffer class_embed;  // [D] F32 in backend memory
  Buffer position_embed;  // [1 + N, D] F32
  Weight pre_ln_w, pre_ln_b;
  std::vector<Layer> layers_;  // only those the selected hidden state needs
  std::vector<ProjectorLayer> projector_;
  std::string tower_source_, projector_source_;
  std::vector<std::shared_ptr<const void>> keep_;  // open weight files
};

// LLaVA's marker for an image in a list of token ids (llava/constants.py).
constexpr int32_t kImageToken = -200;
inline constexpr const char* kImagePlaceholder = "<image>";

// LLaVA's tokenizer_image_token: the text between `<image>` placeholders is
// tokenized chunk by chunk (each as `encode(chunk, add_special)`); a BOS that
// starts every chunk but the first is dropped; kImageToken marks each image.
std::vector<int32_t> tokenize_with_images(const Tokenizer& tok, const std::string& prompt, bool add_special = true);

// LLaVA's CLI: a text sent with images but without any `<image>`
// placeholder gets one "<image>\n" per image in front (where LLaVA puts the
// image of the first message); a text with placeholders is left as it is.
std::string with_image_placeholders(const std::string& text, size_t n_images);

// A prompt with images as input embeddings: ids with kImageToken markers ->
// embeds [n, d] (token rows, then each image's rows in order), and for every
// position the image (or -1) and patch it holds. images[i] is the i-th
// image's embeddings [tokens_per_image, d].
struct MultimodalPrompt {
  std::vector<float> embeds;
  std::vector<int32_t> ids;    // token ids; kImageToken at image positions
  std::vector<int32_t> image;  // per position: image index, or -1 for text
  std::vector<int32_t> patch;  // per position: patch index in its image, or -1
  int64_t size() const { return int64_t(ids.size()); }
};
MultimodalPrompt build_multimodal_prompt(const Model& model, const std::vector<int32_t>& ids_with_markers,
                                         const std::vector<std::vector<float>>& images, int64_t tokens_per_image);

// Feeds positions [from, n-1) of a prompt (text and image embeddings) into
// the cache, which must hold exactly `from` positions (a conversation's
// earlier turns), and returns the last position's token: generate() goes on
// from it (it gives the logits the first new token is sampled from). The
// last position must be text.
int32_t prefill_multimodal_prompt(const Model& model, KvCache& cache, const MultimodalPrompt& prompt, int64_t from = 0,
                                  const ExpertMask* mask = nullptr);

}  // namespace monet
