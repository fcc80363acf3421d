// Loading a checkpoint directory into ModelWeights: every tensor checked for
// presence, shape and dtype against config.json, with messages naming both.
#include <cstring>
#include <filesystem>

#include "backend/backend.h"
#include "model/tensor_table.h"
#include "monet/error.h"
#include "monet/memory.h"
#include "monet/model.h"
#include "monet/safetensors.h"

namespace monet {
namespace {

class Loader {
 public:
  // threads: for the copies the load makes (transposes, q8_0 blocks)
  Loader(const TensorStore& store, const MonetConfig& c, int threads) : store_(store), c_(c), threads_(threads) {}

  const TensorInfo& tensor(const std::string& name, const std::vector<int64_t>& shape, bool may_be_int8 = false) {
    const TensorInfo& t = store_.get(name);
    if (t.shape != shape)
      fail(t.file, ": tensor ", name, " has shape ", shape_str(t.shape), ", expected ", shape_str(shape),
           " from config.json (hidden_size=", c_.hidden_size, ", moe_experts=", c_.moe_experts,
           ", moe_dim=", c_.moe_dim, ", moe_heads=", c_.moe_heads, ")");
    if (t.dtype == DType::I8 && may_be_int8) return t;
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      fail(t.file, ": tensor ", name, " has dtype ", dtype_name(t.dtype), ", expected F32, BF16 or F16",
           t.dtype != DType::I8 ? ""
           : c_.quant_block == 0 ? " (an I8 weight needs quantization_config in config.json)"
                                 : " (norms, routers, biases and BatchNorm statistics stay in full precision)");
    return t;
  }

  // A matrix of the HF shape [rows, cols] as the backend reads it: float
  // dtypes in place from the mapping (transposed: [cols, rows], copied), or
  // int8 + F16 block scales (docs/quantization.md) packed into Q8_0 blocks
  // along our rows.
  Weight matrix(const TensorSpec& spec, bool transposed) {
    const int64_t rows = spec.shape[0], cols = spec.shape[1];
    const bool may_be_int8 = c_.quant_block > 0 && quantized_role(spec.role, c_.tie_word_embeddings);
    const TensorInfo& t = tensor(spec.name, {rows, cols}, may_be_int8);
    if (t.dtype == DType::I8) return quantized(spec, t, transposed);
    return transposed ? matrix_transposed(t, rows, cols) : Weight::view(t.dtype, rows, cols, t.data);
  }

  // HF stores v.. as [rows, cols]; we keep [cols, rows] in the same dtype so
  // that one expert's columns become one contiguous block of rows.
  Weight matrix_transposed(const TensorInfo& t, int64_t rows, int64_t cols) {
    const size_t esize = dtype_size(t.dtype);
    auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[size_t(rows) * size_t(cols) * esize]);
    if (esize == 2) transpose(t.data, rows, cols, buf.get(), std::integral_constant<size_t, 2>());
    else transpose(t.data, rows, cols, buf.get(), std::integral_constant<size_t, 4>());
    Weight w = Weight::view(t.dtype, cols, rows, buf.get());
    w.owned = std::shared_ptr<const void>(buf, buf.get());
    return w;
  }

  // I8 values q and F16 scales d, one per block of kQ8Block values along
  // quant_axis, as Q8_0 blocks (d, q[32]) along the rows we read: HF rows for
  // linear layers (axis 1), HF columns for the transposed v (axis 0).
  Weight quantized(const TensorSpec& spec, const TensorInfo& t, bool transposed) {
    const int64_t rows = spec.shape[0], cols = spec.shape[1];
    const int axis = quant_axis(spec.role);
    if (transposed != (axis == 0))
      fail(t.file, ": tensor ", spec.name, ": internal error: blocks along dim ", axis, " do not match the layout");
    const int64_t blocked = axis == 1 ? cols : rows;
    if (blocked % c_.quant_block != 0)
      fail(t.file, ": tensor ", spec.name, " is I8 with shape ", shape_str(t.shape), ", but dimension ", axis, " (",
           blocked, ") is not a whole number of blocks of ", c_.quant_block);
    const std::string scale_name = quant_scale_name(spec.name);
    const TensorInfo* s = store_.find(scale_name);
    if (!s)
      fail(store_.source(), ": missing tensor ", scale_name, " (the F16 block scales of the I8 tensor ", spec.name, ")");
    std::vector<int64_t> scale_shape = {rows, cols};
    scale_shape[size_t(axis)] /= c_.quant_block;
    if (s->dtype != DType::F16)
      fail(s->file, ": tensor ", scale_name, " has dtype ", dtype_name(s->dtype), ", expected F16 (block scales of ",
           spec.name, ")");
    if (s->shape != scale_shape)
      fail(s->file, ": tensor ", scale_name, " has shape ", shape_str(s->shape), ", expected ", shape_str(scale_shape),
           ": one scale per block of ", c_.quant_block, " values along dimension ", axis, " of ", spec.name, " ",
           shape_str(t.shape));
    const int64_t out_rows = axis == 1 ? rows : cols, nb = blocked / kQ8Block;  // our rows, blocks per row
    const int8_t* q = reinterpret_cast<const int8_t*>(t.data);
    const uint8_t* sb = s->data;
    for (int64_t si = 0; si < out_rows * nb; si++) {
      uint16_t h;
      std::memcpy(&h, sb + 2 * si, 2);
      const float d = f16_to_f32(h);
      if (!(d >= 0.0f && d < 65536.0f))
        fail(s->file, ": tensor ", scale_name, " holds ", d, " at index ", si, ", expected a finite scale >= 0");
    }
    auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[size_t(out_rows * nb) * sizeof(BlockQ8_0)]);
    auto put = [&](int64_t r, int64_t b, const BlockQ8_0& blk) {
      std::memcpy(buf.get() + size_t(r * nb + b) * sizeof(BlockQ8_0), &blk, sizeof blk);
    };
    if (axis == 1) {
#pragma omp parallel for schedule(static) num_threads(threads_)
      for (int64_t r = 0; r < out_rows; r++)
        for (int64_t b = 0; b < nb; b++) {
          BlockQ8_0 blk;
          std::memcpy(&blk.d, sb + 2 * (r * nb + b), 2);
          std::memcpy(blk.q, q + r * cols + b * kQ8Block, kQ8Block);
          put(r, b, blk);
        }
    } else {
      // Our rows are HF columns: a block gathers one column of 32 HF rows.
      // Tiles of 64 columns, so those rows' lines stay cached for 64 blocks
      // (column by column, every block read 32 lines from memory: the
      // 1.4B's q8_0 load took 4.1 s against 1.75 s for bf16).
      constexpr int64_t kTile = 64;
#pragma omp parallel for schedule(static) num_threads(threads_)
      for (int64_t r0 = 0; r0 < out_rows; r0 += kTile)
        for (int64_t b = 0; b < nb; b++)
          for (int64_t r = r0; r < std::min(out_rows, r0 + kTile); r++) {
            BlockQ8_0 blk;
            std::memcpy(&blk.d, sb + 2 * (b * cols + r), 2);
            for (int64_t i = 0; i < kQ8Block; i++) blk.q[i] = q[(b * kQ8Block + i) * cols + r];
            put(r, b, blk);
          }
    }
    Weight w = Weight::view(DType::Q8_0, out_rows, blocked, buf.get());
    w.owned = std::shared_ptr<const void>(buf, buf.get());
    return w;
  }

  // A vector (norm weight, bias, BatchNorm statistic) as an F32 weight [1, n].
  Weight vector(const std::string& name, int64_t n) {
    const TensorInfo& t = tensor(name, {n});
    std::vector<float> v(static_cast<size_t>(n));
    dtype_traits(t.dtype).to_f32(t.data, v.data(), n);
    return Weight::from_f32(v.data(), 1, n, DType::F32);
  }

 private:
  // dst[c, r] = src[r, c] for elements of Size bytes; the source may be unaligned.
  template <size_t Size>
  void transpose(const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst, std::integral_constant<size_t, Size>) {
    constexpr int64_t B = 64;  // tiles keep both sides cache-resident
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t r0 = 0; r0 < rows; r0 += B)
      for (int64_t c0 = 0; c0 < cols; c0 += B)
        for (int64_t r = r0; r < std::min(rows, r0 + B); r++)
          for (int64_t c = c0; c < std::min(cols, c0 + B); c++)
            std::memcpy(dst + (size_t(c) * size_t(rows) + size_t(r)) * Size, src + (size_t(r) * size_t(cols) + size_t(c)) * Size,
                        Size);
  }

  const TensorStore& store_;
  const MonetConfig& c_;
  int threads_;
};

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& opts) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) fail(dir, ": not a checkpoint directory (expected config.json and model.safetensors)");
  std::unique_ptr<Model> m(new Model());
  m->dir_ = dir;
  m->config_ = load_config((fs::path(dir) / "config.json").string());
  BackendOptions bo;
  bo.device = opts.device;
  bo.threads = opts.threads;
  bo.cpu_kernels = opts.cpu_kernels;
  bo.compute = opts.compute;
  bo.huge_pages = opts.huge_pages;
  m->store_ = TensorStore::open_dir(dir);
  // Before the loader reads (its reads then fault 2 MiB pages); where the
  // files cannot be mapped so, the backend copies the weights read in place too.
  if (opts.huge_pages) bo.huge_page_copies_of_mapped = !m->store_->map_huge_pages();
  m->backend_ = make_backend(bo);
  // What the load copies (transposed expert matrices, vectors) must fit: say
  // how much is needed before allocating any of it.
  // (Quantized checkpoints: the int8 matrices are repacked, about 1.06 bytes
  // a value; estimated as a BF16 checkpoint, whose v matrices are copied.)
  check_load_memory(m->config_, m->config_.quant_block ? DType::BF16 : m->store_->get("model.embed_tokens.weight").dtype,
                    0, dir);

  const MonetConfig& c = m->config_;
  Loader ld(*m->store_, c, m->backend_->threads());
  ModelWeights& w = m->weights_;
  w.layers.resize(size_t(c.num_hidden_layers));
  for (const TensorSpec& t : tensor_table(c)) {
    const int64_t rows = t.shape[0];
    LayerWeights* lw = t.layer >= 0 ? &w.layers[size_t(t.layer)] : nullptr;
    auto matrix = [&] { return ld.matrix(t, /*transposed=*/false); };
    auto transposed = [&] { return ld.matrix(t, /*transposed=*/true); };
    auto vector = [&] { return ld.vector(t.name, rows); };
    Weight* dst = nullptr;
    Weight value;
    switch (t.role) {
      case TensorRole::Embed: dst = &w.embed, value = matrix(); break;
      case TensorRole::LmHead: dst = &w.lm_head, value = matrix(); break;
      case TensorRole::FinalNorm: dst = &w.final_norm, value = vector(); break;
      case TensorRole::InputNorm: dst = &lw->input_norm, value = vector(); break;
      case TensorRole::PostNorm: dst = &lw->post_norm, value = vector(); break;
      case TensorRole::Wq: dst = &lw->wq, value = matrix(); break;
      case TensorRole::Wk: dst = &lw->wk, value = matrix(); break;
      case TensorRole::Wv: dst = &lw->wv, value = matrix(); break;
      case TensorRole::Wo: dst = &lw->wo, value = matrix(); break;
      case TensorRole::RouterW1: dst = &lw->router.w1, value = matrix(); break;
      case TensorRole::RouterW2: dst = &lw->router.w2, value = matrix(); break;
      case TensorRole::RouterMean1: dst = &lw->router.mean1, value = vector(); break;
      case TensorRole::RouterVar1: dst = &lw->router.var1, value = vector(); break;
      case TensorRole::RouterMean2: dst = &lw->router.mean2, value = vector(); break;
      case TensorRole::RouterVar2: dst = &lw->router.var2, value = vector(); break;
      case TensorRole::U1: dst = &lw->experts.u1, value = matrix(); break;
      case TensorRole::U1Bias: dst = &lw->experts.u1_bias, value = vector(); break;
      case TensorRole::U2: dst = &lw->experts.u2, value = matrix(); break;
      case TensorRole::U2Bias: dst = &lw->experts.u2_bias, value = vector(); break;
      case TensorRole::V11: dst = &lw->experts.v11, value = transposed(); break;
      case TensorRole::V12: dst = &lw->experts.v12, value = transposed(); break;
      case TensorRole::V21: dst = &lw->experts.v21, value = transposed(); break;
      case TensorRole::V22: dst = &lw->experts.v22, value = transposed(); break;
      case TensorRole::B1: dst = &lw->experts.b1, value = matrix(); break;
      case TensorRole::B2: dst = &lw->experts.b2, value = matrix(); break;
      case TensorRole::U: dst = &lw->experts.u, value = matrix(); break;
      case TensorRole::UBias: dst = &lw->experts.u_bias, value = vector(); break;
      case TensorRole::V: dst = &lw->experts.v, value = transposed(); break;
      case TensorRole::B: dst = &lw->experts.b, value = matrix(); break;
    }
    if (t.kind == TensorKind::RunningStat && t.name.find("running_var") != std::string::npos) {
      const float* v = static_cast<const float*>(value.data);
      for (int64_t h = 0; h < rows; h++)
        if (!(v[h] >= 0.0f))
          fail(m->store_->get(t.name).file, ": ", t.name, " must be non-negative (found ", v[h], " at index ", h, ")");
    }
    *dst = m->backend_->prepare(value);
    // Read from a copy (transposed, converted, or the backend's): the file's pages are not needed.
    if (const TensorInfo* src = m->store_->find(t.name); src && dst->data != src->data) m->store_->release_pages(*src);
  }
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  for (int64_t l = 0; l < c.num_hidden_layers; l++) w.layers[size_t(l)].has_router = c.has_router(l);
  return m;
}

Model::~Model() = default;

int64_t Model::parameter_count() const {
  int64_t n = 0;
  for (const std::string& name : store_->names()) {
    if (name.find("running_") != std::string::npos || name.find("num_batches_tracked") != std::string::npos) continue;
    if (config_.quant_block && name.size() > 6 && name.compare(name.size() - 6, 6, "_scale") == 0) continue;  // block scales
    n += store_->get(name).numel();
  }
  return n;
}

size_t Model::file_huge_page_bytes() const { return store_->huge_page_bytes(); }

size_t Model::weight_bytes() const {
  size_t n = 0;
  for (const std::string& name : store_->names()) n += store_->get(name).nbytes;
  return n;
}

KvCache Model::new_cache(int64_t capacity) const {
  if (capacity < 0) fail("a KV cache capacity must be at least 0, got ", capacity);
  KvCache kv;
  kv.capacity = capacity;
  const size_t row_bytes = size_t(config_.num_key_value_heads * config_.head_dim()) * sizeof(float);
  for (int64_t l = 0; l < config_.num_hidden_layers; l++) {
    kv.k.push_back(backend_->alloc(size_t(capacity) * row_bytes));
    kv.v.push_back(backend_->alloc(size_t(capacity) * row_bytes));
  }
  return kv;
}

int Model::threads() const { return backend_->threads(); }
std::string Model::backend_name() const { return backend_->name(); }

}  // namespace monet
