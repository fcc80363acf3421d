// Random tiny checkpoints written from the tensor table, shared by the model
// tests (test_model.cpp, test_quantize.cpp).
#pragma once
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "model/tensor_table.h"
#include "monet/config.h"
#include "monet/dtype.h"
#include "monet/safetensors.h"

namespace monet_test {

inline monet::MonetConfig tiny_config(monet::Decompose dec, int64_t kv_heads) {
  monet::MonetConfig c;
  c.vocab_size = 97;
  c.hidden_size = 64;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.max_position_embeddings = 128;
  c.moe_dim = 8;
  c.moe_heads = 4;
  c.moe_experts = 16;
  c.moe_topk = 3;
  c.moe_groups = 2;
  c.moe_decompose = dec;
  return c;
}

// Random weights N(0, 0.3/sqrt(cols)) (biases and norms too), BatchNorm
// statistics calibrated to the router logits' scale so that each head keeps
// a few experts.
inline void write_checkpoint(const std::string& dir, const monet::MonetConfig& c, monet::DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<float>> values;
  std::vector<std::vector<uint8_t>> stored;
  std::vector<monet::TensorToWrite> tensors;
  for (const monet::TensorSpec& t : monet::tensor_table(c)) {
    int64_t n = 1;
    for (int64_t s : t.shape) n *= s;
    std::vector<float> v(static_cast<size_t>(n));
    const bool stat = t.kind == monet::TensorKind::RunningStat;
    const double cols = double(t.shape.back());
    std::normal_distribution<float> nd(0.0f, float(0.3 / std::sqrt(cols)));
    for (float& x : v) x = nd(rng);
    if (t.kind == monet::TensorKind::Norm)
      for (float& x : v) x += 1.0f;
    if (stat) {  // z = w y with |y| ~ sqrt(d): std ~ 0.3
      const bool var = t.name.find("running_var") != std::string::npos;
      for (float& x : v) x = var ? 0.09f : 0.0f;
    }
    const monet::DType dt = stat ? monet::DType::F32 : dtype;
    values.push_back(std::move(v));
    stored.emplace_back(monet::dtype_row_bytes(dt, n));
    monet::dtype_traits(dt).from_f32(values.back().data(), stored.back().data(), n);
    tensors.push_back({t.name, dt, t.shape, stored.back().data()});
  }
  std::filesystem::create_directories(dir);
  monet::write_safetensors(dir + "/model.safetensors", tensors);
  monet::write_file_atomic(dir + "/config.json", monet::config_to_json(c));
}

}  // namespace monet_test
