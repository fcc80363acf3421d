// The CLIP vision tower and mm_projector of a LLaVA-style checkpoint, loaded
// from safetensors (or a torch.save projector) and run on the backend.
//
// Forward, as HF CLIPVisionModel (pre-LayerNorm transformer):
//   x = [cls; patches . W_patch^T] + pos        [1+N, D]
//   h_0 = LN_pre(x); h_{i+1} = layer_i(h_i)      (hidden_states[0..L])
//   layer: h += attn(LN1(h)) (all positions see all); h += fc2(act(fc1(LN2(h))))
// LLaVA takes hidden_states[select_layer] (-2: the input of the last layer),
// drops the CLS row for "patch", and projects each row.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "backend/backend.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/torch_checkpoint.h"
#include "monet/vision.h"

namespace monet {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// openai/clip-vit-* vision configs, for a checkpoint that names its tower
// (VisionMonet: "openai/clip-vit-base-patch16") instead of shipping its config.
bool known_tower(const std::string& name, ClipVisionConfig* c) {
  struct Known {
    const char* name;
    int64_t hidden, inter, layers, heads, image, patch;
  };
  static const Known table[] = {
      {"openai/clip-vit-base-patch16", 768, 3072, 12, 12, 224, 16},
      {"openai/clip-vit-base-patch32", 768, 3072, 12, 12, 224, 32},
      {"openai/clip-vit-large-patch14", 1024, 4096, 24, 16, 224, 14},
      {"openai/clip-vit-large-patch14-336", 1024, 4096, 24, 16, 336, 14},
  };
  for (const Known& k : table) {
    if (name != k.name) continue;
    c->hidden_size = k.hidden;
    c->intermediate_size = k.inter;
    c->num_hidden_layers = k.layers;
    c->num_attention_heads = k.heads;
    c->image_size = k.image;
    c->patch_size = k.patch;
    return true;
  }
  return false;
}

json read_json(const std::string& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
}

int64_t get_int(const json& j, const char* key, int64_t def, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return def;
  if (!j[key].is_number_integer()) fail(src, ": \"", key, "\" must be an integer");
  return j[key].get<int64_t>();
}

// A CLIPVisionConfig (or the vision_config of a CLIPConfig) from config.json.
ClipVisionConfig parse_clip_config(const std::string& path) {
  json j = read_json(path);
  if (j.contains("vision_config") && j["vision_config"].is_object()) j = j["vision_config"];
  ClipVisionConfig c;
  c.hidden_size = get_int(j, "hidden_size", c.hidden_size, path);
  c.intermediate_size = get_int(j, "intermediate_size", c.intermediate_size, path);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", c.num_hidden_layers, path);
  c.num_attention_heads = get_int(j, "num_attention_heads", c.num_attention_heads, path);
  c.image_size = get_int(j, "image_size", c.image_size, path);
  c.patch_size = get_int(j, "patch_size", c.patch_size, path);
  if (j.contains("layer_norm_eps") && j["layer_norm_eps"].is_number()) c.layer_norm_eps = j["layer_norm_eps"].get<double>();
  if (j.contains("hidden_act") && j["hidden_act"].is_string()) c.hidden_act = j["hidden_act"].get<std::string>();
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    fail(path, ": hidden_act \"", c.hidden_act, "\" is not supported (quick_gelu or gelu)");
  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads ||
      c.patch_size <= 0 || c.image_size < c.patch_size || c.num_hidden_layers <= 0 || c.intermediate_size <= 0)
    fail(path, ": inconsistent vision config (hidden_size ", c.hidden_size, ", heads ", c.num_attention_heads,
         ", image_size ", c.image_size, ", patch_size ", c.patch_size, ")");
  return c;
}

// CLIPImageProcessor settings from preprocessor_config.json (the fields the
// processor reads; absent fields keep the CLIP defaults).
void parse_preprocessor(const std::string& path, ClipPreprocess* p) {
  const json j = read_json(path);
  if (j.contains("size")) {
    if (j["size"].is_object() && j["size"].contains("shortest_edge")) p->shortest_edge = j["size"]["shortest_edge"].get<int64_t>();
    else if (j["size"].is_number_integer()) p->shortest_edge = j["size"].get<int64_t>();
    else fail(path, ": only size {\"shortest_edge\": N} is supported");
  }
  if (j.contains("crop_size")) {
    if (j["crop_size"].is_object()) {
      p->crop_height = j["crop_size"].value("height", p->crop_height);
      p->crop_width = j["crop_size"].value("width", p->crop_width);
    } else if (j["crop_size"].is_number_integer()) {
      p->crop_height = p->crop_width = j["crop_size"].get<int64_t>();
    }
  }
  for (const char* key : {"image_mean", "image_std"}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_array() || j[key].size() != 3) fail(path, ": ", key, " must be 3 numbers");
    auto& dst = std::string(key) == "image_mean" ? p->mean : p->std;
    for (size_t c = 0; c < 3; c++) dst[c] = j[key][c].get<double>();
  }
  if (j.contains("rescale_factor")) p->rescale = j["rescale_factor"].get<double>();
  if (j.value("resample", 3) != 3) fail(path, ": only bicubic resampling (resample 3) is supported");
  if (!j.value("do_center_crop", true) || !j.value("do_resize", true) || !j.value("do_normalize", true) ||
      !j.value("do_rescale", true))
    fail(path, ": do_resize, do_center_crop, do_rescale and do_normalize must be true");
}

// Where the weights of a vision tower or projector live: one or more stores.
struct Source {
  std::vector<const TensorStore*> stores;
  const TensorInfo* find(const std::string& name) const {
    for (const TensorStore* s : stores)
      if (const TensorInfo* t = s->find(name)) return t;
    return nullptr;
  }
};

// "model.layers (288), model.embed_tokens (1), ..." — the first two name
// components of a store's tensors, for messages about what was found.
std::string name_summary(const TensorStore& s) {
  std::map<std::string, int> groups;
  for (const std::string& n : s.names()) {
    size_t dot = n.find('.');
    if (dot != std::string::npos) dot = n.find('.', dot + 1);
    groups[n.substr(0, dot)]++;
  }
  std::string out;
  int shown = 0;
  for (const auto& [g, count] : groups) {
    if (shown++ == 12) return out + ", ...";
    out += (out.empty() ? "" : ", ") + g + " (" + std::to_string(count) + ")";
  }
  return out;
}

// Names ending in `suffix`, with the suffix removed (the prefixes).
std::vector<std::string> prefixes_of(const TensorStore& s, const std::string& suffix) {
  std::vector<std::string> out;
  for (const std::string& n : s.names())
    if (n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(n.substr(0, n.size() - suffix.size()));
  return out;
}

class WeightReader {
 public:
  WeightReader(Backend& be, std::function<const TensorInfo*(const std::string&)> find, std::string where)
      : be_(be), find_(std::move(find)), where_(std::move(where)) {}

  const TensorInfo& tensor(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorInfo* t = find_(name);
    if (!t) fail(where_, ": missing tensor ", name);
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    // A conv weight [D, 3, p, p] is read as the matrix [D, 3*p*p]: compare element counts and the first dim.
    if (t->numel() != numel || t->shape.empty() || t->shape[0] != shape[0])
      fail(t->file, ": tensor ", name, " has shape ", t->shape_str(), ", expected ", shape_str(shape),
           " from the vision config");
    if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
      fail(t->file, ": tensor ", name, " has dtype ", dtype_name(t->dtype), ", expected F32, BF16 or F16");
    return *t;
  }
  Weight matrix(const std::string& name, int64_t rows, int64_t cols) {
    const TensorInfo& t = tensor(name, {rows, cols});
    return be_.prepare(Weight::view(t.dtype, rows, cols, t.data));
  }
  std::vector<float> values(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorInfo& t = tensor(name, shape);
    std::vector<float> v(size_t(t.numel()));
    dtype_traits(t.dtype).to_f32(t.data, v.data(), t.numel());
    return v;
  }
  Weight vector(const std::string& name, int64_t n) {
    const std::vector<float> v = values(name, {n});
    return be_.prepare(Weight::from_f32(v.data(), 1, n, DType::F32));
  }
  bool has(const std::string& name) const { return find_(name) != nullptr; }

 private:
  Backend& be_;
  std::function<const TensorInfo*(const std::string&)> find_;
  std::string where_;
};

}  // namespace

bool is_llava_config(const std::string& path) {
  const json j = read_json(path);
  return j.contains("mm_vision_tower") && j["mm_vision_tower"].is_string();
}

LlavaConfig load_llava_config(const std::string& path) {
  const json j = read_json(path);
  LlavaConfig c;
  if (!j.contains("mm_vision_tower") || !j["mm_vision_tower"].is_string())
    fail(path, ": no \"mm_vision_tower\": not a LLaVA-style (vision) checkpoint");
  c.vision_tower = j["mm_vision_tower"].get<std::string>();
  c.mm_hidden_size = get_int(j, "mm_hidden_size", 0, path);
  if (j.contains("mm_projector_type") && j["mm_projector_type"].is_string()) c.projector_type = j["mm_projector_type"];
  c.select_layer = get_int(j, "mm_vision_select_layer", -1, path);
  if (j.contains("mm_vision_select_feature") && j["mm_vision_select_feature"].is_string())
    c.select_feature = j["mm_vision_select_feature"];
  if (j.contains("image_aspect_ratio") && j["image_aspect_ratio"].is_string()) c.image_aspect_ratio = j["image_aspect_ratio"];
  // What this engine does not implement is refused rather than run differently.
  if (c.select_feature != "patch" && c.select_feature != "cls_patch")
    fail(path, ": mm_vision_select_feature \"", c.select_feature, "\" is not supported (patch or cls_patch)");
  if (c.image_aspect_ratio != "pad" && c.image_aspect_ratio != "square")
    fail(path, ": image_aspect_ratio \"", c.image_aspect_ratio, "\" is not supported (pad or square)");
  if (j.value("mm_use_im_start_end", false) || j.value("mm_use_im_patch_token", false))
    fail(path, ": mm_use_im_start_end / mm_use_im_patch_token are not supported");
  if (j.contains("mm_patch_merge_type") && j["mm_patch_merge_type"].is_string() && j["mm_patch_merge_type"] != "flat")
    fail(path, ": mm_patch_merge_type \"", j["mm_patch_merge_type"].get<std::string>(), "\" is not supported (flat)");
  if (c.projector_type != "linear" && c.projector_type != "identity" &&
      !std::regex_match(c.projector_type, std::regex("mlp[1-9][0-9]*x_gelu")))
    fail(path, ": mm_projector_type \"", c.projector_type, "\" is not supported (linear, mlpNx_gelu, identity)");
  return c;
}

std::unique_ptr<VisionTower> VisionTower::load(const std::string& model_dir, int64_t hidden_size, Backend& backend,
                                               const VisionLoadOptions& opts) {
  std::unique_ptr<VisionTower> vt(new VisionTower());
  vt->backend_ = &backend;
  vt->hidden_size_ = hidden_size;
  const std::string config_path = (fs::path(model_dir) / "config.json").string();
  vt->llava_ = load_llava_config(config_path);
  LlavaConfig& lc = vt->llava_;

  // The tower directory: --vision-tower, or mm_vision_tower when it names one.
  std::string tower_dir = opts.vision_tower_dir;
  if (tower_dir.empty()) {
    fs::path p(lc.vision_tower);
    if (p.is_relative()) p = fs::path(model_dir) / p;
    std::error_code ec;
    if (fs::exists(p / "config.json", ec)) tower_dir = p.string();
  } else if (!fs::exists(fs::path(tower_dir) / "config.json")) {
    fail(tower_dir, ": not a CLIP vision tower directory (no config.json)");
  }
  ClipVisionConfig& cc = vt->clip_;
  if (!tower_dir.empty()) {
    cc = parse_clip_config((fs::path(tower_dir) / "config.json").string());
  } else if (!known_tower(lc.vision_tower, &cc)) {
    fail(config_path, ": mm_vision_tower \"", lc.vision_tower,
         "\" is neither a directory with config.json nor a known openai/clip-vit-* tower; give --vision-tower DIR");
  }
  if (lc.mm_hidden_size && lc.mm_hidden_size != cc.hidden_size)
    fail(config_path, ": mm_hidden_size ", lc.mm_hidden_size, " but the vision tower's hidden_size is ", cc.hidden_size);

  // Preprocessing: the tower's preprocessor_config.json, else CLIP's defaults at the tower's resolution.
  ClipPreprocess& pp = vt->preprocess_;
  pp.shortest_edge = pp.crop_height = pp.crop_width = cc.image_size;
  if (!tower_dir.empty() && fs::exists(fs::path(tower_dir) / "preprocessor_config.json"))
    parse_preprocessor((fs::path(tower_dir) / "preprocessor_config.json").string(), &pp);
  pp.pad_to_square = lc.image_aspect_ratio == "pad";
  if (pp.crop_height != cc.image_size || pp.crop_width != cc.image_size)
    fail(tower_dir, ": preprocessor crop ", pp.crop_height, "x", pp.crop_width, " differs from the tower's image_size ",
         cc.image_size);

  // Weight files: the checkpoint's, and the tower directory's when given.
  auto model_store = std::shared_ptr<TensorStore>(TensorStore::open_dir(model_dir));
  vt->keep_.push_back(model_store);
  std::shared_ptr<TensorStore> tower_store;
  if (!tower_dir.empty() && (fs::exists(fs::path(tower_dir) / "model.safetensors") ||
                             fs::exists(fs::path(tower_dir) / "model.safetensors.index.json"))) {
    tower_store = std::shared_ptr<TensorStore>(TensorStore::open_dir(tower_dir));
    vt->keep_.push_back(tower_store);
  }

  // The tower's prefix: the one name ending in vision_model.embeddings.patch_embedding.weight.
  // --vision-tower's weights win; else the checkpoint's, else mm_vision_tower's directory.
  const std::string anchor = "vision_model.embeddings.patch_embedding.weight";
  const TensorStore* tower_from = nullptr;
  std::vector<std::string> found;
  std::vector<const TensorStore*> order;
  if (!opts.vision_tower_dir.empty()) order = {tower_store.get(), model_store.get()};
  else order = {model_store.get(), tower_store.get()};
  for (const TensorStore* s : order) {
    if (!s) continue;
    found = prefixes_of(*s, anchor);
    if (!found.empty()) {
      tower_from = s;
      break;
    }
  }
  if (!tower_from)
    fail(model_dir, ": no CLIP vision tower weights (no tensor named *", anchor, "); ", model_store->source(),
         " holds: ", name_summary(*model_store),
         tower_store ? "; " + tower_store->source() + " holds: " + name_summary(*tower_store) : std::string(),
         ". Give --vision-tower DIR (a CLIPVisionModel with model.safetensors)");
  if (found.size() > 1) {
    std::string list;
    for (const std::string& f : found) list += (list.empty() ? "" : ", ") + f + "vision_model.";
    fail(tower_from->source(), ": several vision towers (", list, "); expected one");
  }
  const std::string prefix = found[0] + "vision_model.";
  vt->tower_source_ = tower_from->source() + " (" + (prefix.empty() ? "no prefix" : prefix + "*") + ")";

  const int64_t D = cc.hidden_size, I = cc.intermediate_size, p = cc.patch_size, N = cc.num_patches();
  WeightReader tw(backend, [s = tower_from, prefix](const std::string& n) { return s->find(prefix + n); },
                  tower_from->source());
  vt->patch_embed = tw.matrix("embeddings.patch_embedding.weight", D, 3 * p * p);
  {
    // [1 + N, D]: row 0 is the class embedding plus position 0; rows 1.. the positions.
    std::vector<float> pos = tw.values("embeddings.position_embedding.weight", {1 + N, D});
    const std::vector<float> cls = tw.values("embeddings.class_embedding", {D});
    for (int64_t i = 0; i < D; i++) pos[size_t(i)] += cls[size_t(i)];
    vt->position_embed = backend.alloc(pos.size() * sizeof(float));
    backend.from_host(vt->position_embed.data(), pos.data(), pos.size() * sizeof(float));
  }
  vt->pre_ln_w = tw.vector("pre_layrnorm.weight", D);
  vt->pre_ln_b = tw.vector("pre_layrnorm.bias", D);
  // hidden_states has L+1 entries; entry s is the output of layer s-1, so layers 0..s-1 run.
  const int64_t L = cc.num_hidden_layers;
  const int64_t s = lc.select_layer < 0 ? L + 1 + lc.select_layer : lc.select_layer;
  if (s < 0 || s > L) fail(config_path, ": mm_vision_select_layer ", lc.select_layer, " is outside the tower's ", L + 1,
                            " hidden states");
  for (int64_t l = 0; l < s; l++) {
    const std::string q = "encoder.layers." + std::to_string(l) + ".";
    Layer ly;
    ly.ln1_w = tw.vector(q + "layer_norm1.weight", D);
    ly.ln1_b = tw.vector(q + "layer_norm1.bias", D);
    ly.ln2_w = tw.vector(q + "layer_norm2.weight", D);
    ly.ln2_b = tw.vector(q + "layer_norm2.bias", D);
    ly.wq = tw.matrix(q + "self_attn.q_proj.weight", D, D);
    ly.bq = tw.vector(q + "self_attn.q_proj.bias", D);
    ly.wk = tw.matrix(q + "self_attn.k_proj.weight", D, D);
    ly.bk = tw.vector(q + "self_attn.k_proj.bias", D);
    ly.wv = tw.matrix(q + "self_attn.v_proj.weight", D, D);
    ly.bv = tw.vector(q + "self_attn.v_proj.bias", D);
    ly.wo = tw.matrix(q + "self_attn.out_proj.weight", D, D);
    ly.bo = tw.vector(q + "self_attn.out_proj.bias", D);
    ly.fc1 = tw.matrix(q + "mlp.fc1.weight", I, D);
    ly.fc1_b = tw.vector(q + "mlp.fc1.bias", I);
    ly.fc2 = tw.matrix(q + "mlp.fc2.weight", D, I);
    ly.fc2_b = tw.vector(q + "mlp.fc2.bias", D);
    vt->layers_.push_back(std::move(ly));
  }
  // The tower must have exactly L layers, whatever the selection uses.
  if (!tw.has("encoder.layers." + std::to_string(L - 1) + ".mlp.fc2.weight") ||
      tw.has("encoder.layers." + std::to_string(L) + ".mlp.fc2.weight"))
    fail(tower_from->source(), ": the vision tower (", prefix, "*) does not have the ", L,
         " layers its config says");

  // The projector: an explicit file, else the checkpoint's *mm_projector.*, else mm_projector.bin.
  int depth = 0;
  if (lc.projector_type == "linear") depth = 1;
  else if (lc.projector_type != "identity") depth = std::stoi(lc.projector_type.substr(3));
  if (depth > 0) {
    const std::string suffix = lc.projector_type == "linear" ? "mm_projector.weight" : "mm_projector.0.weight";
    std::function<const TensorInfo*(const std::string&)> find;
    std::vector<std::string> names, found_p;
    std::string pfile = opts.projector_file;
    if (pfile.empty()) {
      found_p = prefixes_of(*model_store, suffix);
      if (!found_p.empty()) {
        names = model_store->names();
        find = [model_store](const std::string& n) { return model_store->find(n); };
        pfile = model_store->source();
      } else if (fs::exists(fs::path(model_dir) / "mm_projector.bin")) {
        pfile = (fs::path(model_dir) / "mm_projector.bin").string();
      } else {
        fail(model_dir, ": no projector (no *", suffix, " tensor in ", model_store->source(),
             ", no mm_projector.bin); ", model_store->source(), " holds: ", name_summary(*model_store));
      }
    }
    if (!find) {
      if (pfile.size() > 12 && pfile.compare(pfile.size() - 12, 12, ".safetensors") == 0) {
        auto st = std::shared_ptr<TensorStore>(TensorStore::open_file(pfile));
        vt->keep_.push_back(st);
        names = st->names();
        find = [st](const std::string& n) { return st->find(n); };
      } else {
        auto tc = std::make_shared<TorchCheckpoint>(pfile);
        vt->keep_.push_back(tc);
        for (const TensorInfo& t : tc->tensors()) names.push_back(t.name);
        find = [tc](const std::string& n) { return tc->find(n); };
      }
      for (const std::string& n : names)
        if (n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0)
          found_p.push_back(n.substr(0, n.size() - suffix.size()));
    }
    if (found_p.size() != 1) {
      std::string list;
      for (size_t i = 0; i < names.size() && i < 40; i++) list += (i ? ", " : "") + names[i];
      fail(pfile, ": expected one projector (*", suffix, "), found ", found_p.size(), "; tensors: ", list);
    }
    const std::string pprefix = found_p[0] + "mm_projector.";
    vt->projector_source_ = pfile + " (" + pprefix + "*)";
    WeightReader pw(backend, find, vt->projector_source_);
    for (int i = 0; i < depth; i++) {
      const std::string idx = lc.projector_type == "linear" ? "" : std::to_string(2 * i) + ".";
      if (i > 0) vt->projector_.push_back({true, {}, {}});
      ProjectorLayer pl;
      pl.w = pw.matrix(pprefix + idx + "weight", hidden_size, i == 0 ? D : hidden_size);
      pl.b = pw.vector(pprefix + idx + "bias", hidden_size);
      vt->projector_.push_back(std::move(pl));
    }
  } else {
    if (D != hidden_size) fail(config_path, ": identity projector but the tower's width ", D, " != hidden_size ", hidden_size);
    vt->projector_source_ = "identity";
  }
  return vt;
}

VisionTower::~VisionTower() = default;

int64_t VisionTower::tokens_per_image() const {
  return clip_.num_patches() + (llava_.select_feature == "cls_patch" ? 1 : 0);
}

std::string VisionTower::describe() const {
  std::ostringstream os;
  os << "CLIP ViT " << clip_.hidden_size << "x" << clip_.num_hidden_layers << " (" << clip_.image_size << " px, patch "
     << clip_.patch_size << ", " << tokens_per_image() << " tokens per image) from " << tower_source_ << "; projector "
     << llava_.projector_type << " from " << projector_source_;
  return os.str();
}

std::vector<float> VisionTower::encode(const float* pixels, int64_t batch) const {
  Backend& be = *backend_;
  const ClipVisionConfig& c = clip_;
  const int64_t D = c.hidden_size, I = c.intermediate_size, p = c.patch_size, g = c.grid(), N = c.num_patches();
  const int64_t S = c.image_size, T1 = 1 + N, T = batch * T1, nh = c.num_attention_heads, hd = D / nh;
  const size_t f = sizeof(float);
  if (batch <= 0) fail("VisionTower::encode: no images");

  // Patches [B*N, 3*p*p] in raster order, each flattened as the conv weight (channel, row, column).
  std::vector<float> patches(size_t(batch * N * 3 * p * p));
  for (int64_t b = 0; b < batch; b++)
    for (int64_t gy = 0; gy < g; gy++)
      for (int64_t gx = 0; gx < g; gx++) {
        float* out = &patches[size_t(((b * N) + gy * g + gx) * 3 * p * p)];
        for (int64_t ch = 0; ch < 3; ch++)
          for (int64_t y = 0; y < p; y++)
            std::memcpy(out + (ch * p + y) * p, pixels + ((b * 3 + ch) * S + gy * p + y) * S + gx * p, size_t(p) * f);
      }
  Buffer patch_in = be.alloc(patches.size() * f), patch_out = be.alloc(size_t(batch * N * D) * f);
  be.from_host(patch_in.data(), patches.data(), patches.size() * f);
  be.linear(patch_embed, patch_in.f32(), batch * N, patch_out.f32());

  // x = [cls; patches] + pos, then the pre-LayerNorm.
  Buffer x = be.alloc(size_t(T * D) * f), h = be.alloc(size_t(T * D) * f);
  const std::vector<float> zero(size_t(D), 0.0f);
  for (int64_t b = 0; b < batch; b++) {
    float* xb = x.f32() + b * T1 * D;
    be.from_host(xb, zero.data(), size_t(D) * f);
    be.copy(xb + D, patch_out.f32() + b * N * D, size_t(N * D) * f);
    be.add(xb, position_embed.f32(), T1 * D);
  }
  be.layernorm(x.f32(), pre_ln_w, pre_ln_b, T, D, c.layer_norm_eps, h.f32());
  std::swap(x, h);  // x: hidden_states[0]

  Buffer q = be.alloc(size_t(T * D) * f), k = be.alloc(size_t(T * D) * f), v = be.alloc(size_t(T * D) * f);
  Buffer att = be.alloc(size_t(T * D) * f), mlp = be.alloc(size_t(T * I) * f);
  std::vector<AttentionSeq> seqs(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; b++) seqs[size_t(b)] = {b * T1, T1, 0, k.f32() + b * T1 * D, v.f32() + b * T1 * D};
  const Activation act = c.hidden_act == "gelu" ? Activation::Gelu : Activation::GeluQuick;
  for (const Layer& ly : layers_) {
    be.layernorm(x.f32(), ly.ln1_w, ly.ln1_b, T, D, c.layer_norm_eps, h.f32());
    be.linear(ly.wq, h.f32(), T, q.f32(), &ly.bq);
    be.linear(ly.wk, h.f32(), T, k.f32(), &ly.bk);
    be.linear(ly.wv, h.f32(), T, v.f32(), &ly.bv);
    be.attention(q.f32(), seqs.data(), batch, nh, nh, hd, /*causal=*/false, att.f32());
    be.linear(ly.wo, att.f32(), T, h.f32(), &ly.bo);
    be.add(x.f32(), h.f32(), T * D);
    be.layernorm(x.f32(), ly.ln2_w, ly.ln2_b, T, D, c.layer_norm_eps, h.f32());
    be.linear(ly.fc1, h.f32(), T, mlp.f32(), &ly.fc1_b);
    be.activation(act, mlp.f32(), T * I);
    be.linear(ly.fc2, mlp.f32(), T, h.f32(), &ly.fc2_b);
    be.add(x.f32(), h.f32(), T * D);
  }

  // The selected rows: all, or without CLS.
  const int64_t first = llava_.select_feature == "patch" ? 1 : 0, n = T1 - first;
  std::vector<float> out(size_t(batch * n * D));
  for (int64_t b = 0; b < batch; b++)
    be.to_host(out.data() + b * n * D, x.f32() + (b * T1 + first) * D, size_t(n * D) * f);
  return out;
}

std::vector<float> VisionTower::project(const float* features, int64_t n) const {
  Backend& be = *backend_;
  const size_t f = sizeof(float);
  const int64_t D = clip_.hidden_size, H = hidden_size_;
  if (projector_.empty()) return std::vector<float>(features, features + n * D);
  Buffer in = be.alloc(size_t(n * D) * f), a = be.alloc(size_t(n * H) * f), b = be.alloc(size_t(n * H) * f);
  be.from_host(in.data(), features, size_t(n * D) * f);
  const float* cur = in.f32();
  for (const ProjectorLayer& pl : projector_) {
    if (pl.gelu) {
      be.activation(Activation::Gelu, a.f32(), n * H);
      continue;
    }
    float* dst = cur == a.f32() ? b.f32() : a.f32();
    be.linear(pl.w, cur, n, dst, &pl.b);
    if (dst == b.f32()) std::swap(a, b);  // the latest output is always in `a`
    cur = a.f32();
  }
  std::vector<float> out(size_t(n * H));
  be.to_host(out.data(), a.data(), out.size() * f);
  return out;
}

std::vector<float> VisionTower::embed_image(const Image& image) const {
  const std::vector<float> pixels = clip_preprocess(image, preprocess_);
  const std::vector<float> feats = encode(pixels.data(), 1);
  return project(feats.data(), tokens_per_image());
}

}  // namespace monet
