// Loading a checkpoint directory into ModelWeights: every tensor checked for
// presence, shape and dtype against config.json, with messages naming both.
#include <omp.h>

#include <cstring>
#include <filesystem>

#include "monet/error.h"
#include "monet/model.h"
#include "monet/safetensors.h"

namespace monet {
namespace {

class Loader {
 public:
  Loader(const TensorStore& store, const MonetConfig& c) : store_(store), c_(c) {}

  const TensorInfo& tensor(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorInfo& t = store_.get(name);
    if (t.shape != shape)
      fail(t.file, ": tensor ", name, " has shape ", shape_str(t.shape), ", expected ", shape_str(shape),
           " from config.json (hidden_size=", c_.hidden_size, ", moe_experts=", c_.moe_experts,
           ", moe_dim=", c_.moe_dim, ", moe_heads=", c_.moe_heads, ")");
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      fail(t.file, ": tensor ", name, " has dtype ", dtype_name(t.dtype), ", expected F32, BF16 or F16");
    return t;
  }

  // A matrix as stored: F32 and BF16 are used in place; F16 is widened once.
  Weight matrix(const std::string& name, int64_t rows, int64_t cols) {
    const TensorInfo& t = tensor(name, {rows, cols});
    Weight w{t.dtype, rows, cols, t.data, nullptr};
    if (t.dtype == DType::F16) w = widened(t, rows, cols);
    return w;
  }

  // HF stores v.. as [rows, cols]; we keep [cols, rows] so that one expert's
  // columns become one contiguous block of rows.
  Weight matrix_transposed(const std::string& name, int64_t rows, int64_t cols) {
    const TensorInfo& t = tensor(name, {rows, cols});
    const bool keep_bf16 = t.dtype == DType::BF16;
    Weight w{keep_bf16 ? DType::BF16 : DType::F32, cols, rows, nullptr, nullptr};
    const size_t n = size_t(rows) * size_t(cols);
    if (keep_bf16) {
      auto buf = std::shared_ptr<uint16_t[]>(new uint16_t[n]);
      const uint16_t* src = reinterpret_cast<const uint16_t*>(t.data);
      transpose(src, rows, cols, buf.get());
      w.data = buf.get();
      w.owned = std::shared_ptr<void>(buf, buf.get());
    } else {
      Weight wide = t.dtype == DType::F16 ? widened(t, rows, cols) : Weight{DType::F32, rows, cols, t.data, nullptr};
      auto buf = std::shared_ptr<float[]>(new float[n]);
      transpose(wide.f32(), rows, cols, buf.get());
      w.data = buf.get();
      w.owned = std::shared_ptr<void>(buf, buf.get());
    }
    return w;
  }

  std::vector<float> vector(const std::string& name, int64_t n) {
    return to_f32(tensor(name, {n}));
  }

  // BatchNorm buffers: float32 [H] in every released checkpoint.
  std::vector<float> buffer(const std::string& name, int64_t n) {
    const TensorInfo& t = tensor(name, {n});
    return to_f32(t);
  }

 private:
  static std::vector<float> to_f32(const TensorInfo& t) {
    std::vector<float> out(size_t(t.numel()));
    for (size_t i = 0; i < out.size(); i++) out[i] = float(t.element(i));
    return out;
  }

  static Weight widened(const TensorInfo& t, int64_t rows, int64_t cols) {
    const size_t n = size_t(rows) * size_t(cols);
    auto buf = std::shared_ptr<float[]>(new float[n]);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = float(t.element(i));
    Weight w{DType::F32, rows, cols, buf.get(), nullptr};
    w.owned = std::shared_ptr<void>(buf, buf.get());
    return w;
  }

  template <class T>
  static void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
    constexpr int64_t B = 64;  // tiles keep both sides cache-resident
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += B)
      for (int64_t c0 = 0; c0 < cols; c0 += B)
        for (int64_t r = r0; r < std::min(rows, r0 + B); r++)
          for (int64_t c = c0; c < std::min(cols, c0 + B); c++) {
            T v;
            std::memcpy(&v, src + r * cols + c, sizeof(T));  // source may be unaligned
            dst[c * rows + r] = v;
          }
  }

  const TensorStore& store_;
  const MonetConfig& c_;
};

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& opts) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) fail(dir, ": not a checkpoint directory (expected config.json and model.safetensors)");
  std::unique_ptr<Model> m(new Model());
  m->dir_ = dir;
  m->config_ = load_config((fs::path(dir) / "config.json").string());
  m->threads_ = opts.threads > 0 ? opts.threads : omp_get_num_procs();
  omp_set_num_threads(m->threads_);
  m->store_ = TensorStore::open_dir(dir);

  const MonetConfig& c = m->config_;
  const int64_t d = c.hidden_size, hd = c.head_dim(), nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int64_t H = c.moe_heads, E = c.moe_experts, mdim = c.moe_dim, V = c.vocab_size;
  Loader ld(*m->store_, c);
  ModelWeights& w = m->weights_;
  w.embed = ld.matrix("model.embed_tokens.weight", V, d);
  w.lm_head = c.tie_word_embeddings ? w.embed : ld.matrix("lm_head.weight", V, d);
  w.final_norm = ld.vector("model.norm.weight", d);
  w.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; l++) {
    LayerWeights& lw = w.layers[size_t(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    lw.input_norm = ld.vector(p + "input_layernorm.weight", d);
    lw.post_norm = ld.vector(p + "post_attention_layernorm.weight", d);
    lw.wq = ld.matrix(p + "self_attn.q_proj.weight", nh * hd, d);
    lw.wk = ld.matrix(p + "self_attn.k_proj.weight", nkv * hd, d);
    lw.wv = ld.matrix(p + "self_attn.v_proj.weight", nkv * hd, d);
    lw.wo = ld.matrix(p + "self_attn.o_proj.weight", d, nh * hd);
    lw.has_router = c.has_router(l);
    if (lw.has_router) {
      RouterWeights& r = lw.router;
      r.w1 = ld.matrix(p + "router.w1.weight", H * E, d);
      r.w2 = ld.matrix(p + "router.w2.weight", H * E, d);
      r.mean1 = ld.buffer(p + "router.norm1.running_mean", H);
      r.var1 = ld.buffer(p + "router.norm1.running_var", H);
      r.mean2 = ld.buffer(p + "router.norm2.running_mean", H);
      r.var2 = ld.buffer(p + "router.norm2.running_var", H);
      for (int64_t h = 0; h < H; h++)
        if (!(r.var1[size_t(h)] >= 0.0f) || !(r.var2[size_t(h)] >= 0.0f))
          fail(m->store_->get(p + "router.norm1.running_var").file, ": ", p,
               "router.norm{1,2}.running_var must be non-negative");
    }
    if (c.moe_decompose == Decompose::Vertical) {
      const int64_t half = E * mdim / 2;
      lw.u1 = ld.matrix(p + "moe.u1.weight", half, d);
      lw.u2 = ld.matrix(p + "moe.u2.weight", half, d);
      lw.u1_bias = ld.vector(p + "moe.u1.bias", half);
      lw.u2_bias = ld.vector(p + "moe.u2.bias", half);
      lw.v11 = ld.matrix_transposed(p + "moe.v11.weight", d / 2, half);
      lw.v12 = ld.matrix_transposed(p + "moe.v12.weight", d / 2, half);
      lw.v21 = ld.matrix_transposed(p + "moe.v21.weight", d / 2, half);
      lw.v22 = ld.matrix_transposed(p + "moe.v22.weight", d / 2, half);
      lw.b1 = ld.matrix(p + "moe.b1", E, d / 2);
      lw.b2 = ld.matrix(p + "moe.b2", E, d / 2);
    } else {
      lw.u = ld.matrix(p + "moe.u.weight", E * mdim, d);
      lw.u_bias = ld.vector(p + "moe.u.bias", E * mdim);
      lw.v = ld.matrix_transposed(p + "moe.v.weight", d, E * mdim);
      lw.b = ld.matrix(p + "moe.b", E, d);
    }
  }
  return m;
}

Model::~Model() = default;

int64_t Model::parameter_count() const {
  int64_t n = 0;
  for (const std::string& name : store_->names()) {
    if (name.find("running_") != std::string::npos || name.find("num_batches_tracked") != std::string::npos) continue;
    n += store_->get(name).numel();
  }
  return n;
}

size_t Model::weight_bytes() const {
  size_t n = 0;
  for (const std::string& name : store_->names()) n += store_->get(name).nbytes;
  return n;
}

KvCache Model::new_cache(int64_t capacity) const {
  KvCache kv;
  kv.capacity = capacity;
  const size_t row = size_t(config_.num_key_value_heads * config_.head_dim());
  kv.k.assign(size_t(config_.num_hidden_layers), std::vector<float>(size_t(capacity) * row));
  kv.v.assign(size_t(config_.num_hidden_layers), std::vector<float>(size_t(capacity) * row));
  return kv;
}

}  // namespace monet
