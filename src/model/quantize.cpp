// `monet quantize`: a checkpoint directory rewritten with block int8 weights
// (docs/quantization.md). Each quantized matrix W becomes two tensors in the
// HF layout: W as I8 (the same shape) and W_scale as F16, one scale per block
// of 32 values along quant_axis (the shape with that dimension divided by 32).
// A block holds q = round(x / d) with d = max|x| / 127, as ggml's Q8_0.
#include "monet/quantize.h"

#include <unistd.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "model/tensor_table.h"
#include "monet/config.h"
#include "monet/error.h"
#include "monet/safetensors.h"

namespace monet {

namespace fs = std::filesystem;

namespace {

struct QuantizedTensor {
  std::vector<int8_t> q;       // the HF shape
  std::vector<uint16_t> scale; // F16, the HF shape with quant_axis divided by the block
};

// Quantizes the [rows, cols] matrix `values` in blocks of kQ8Block along
// `axis` (1: along a row; 0: down a column), through the Q8_0 dtype traits so
// that the blocks are exactly what the kernels read.
QuantizedTensor quantize_matrix(const std::vector<float>& values, int64_t rows, int64_t cols, int axis) {
  const int64_t lines = axis == 1 ? rows : cols, len = axis == 1 ? cols : rows;  // a line: values along the axis
  const int64_t nb = len / kQ8Block;
  QuantizedTensor out;
  out.q.resize(values.size());
  out.scale.resize(size_t(lines * nb));
  std::vector<float> line(static_cast<size_t>(len));
  std::vector<BlockQ8_0> blocks(static_cast<size_t>(nb));
  for (int64_t l = 0; l < lines; l++) {
    for (int64_t i = 0; i < len; i++) line[size_t(i)] = axis == 1 ? values[size_t(l * cols + i)] : values[size_t(i * cols + l)];
    dtype_traits(DType::Q8_0).from_f32(line.data(), blocks.data(), len);
    for (int64_t b = 0; b < nb; b++) {
      // scale [rows, cols/32] (axis 1) or [rows/32, cols] (axis 0)
      out.scale[size_t(axis == 1 ? l * nb + b : b * cols + l)] = blocks[size_t(b)].d;
      for (int64_t i = 0; i < kQ8Block; i++) {
        const int64_t at = b * kQ8Block + i;
        out.q[size_t(axis == 1 ? l * cols + at : at * cols + l)] = blocks[size_t(b)].q[i];
      }
    }
  }
  return out;
}

}  // namespace

QuantizeSummary quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, const std::string& type) {
  if (type != "q8_0") fail("quantization type \"", type, "\" is unknown (expected q8_0)");
  std::error_code ec;
  if (fs::exists(out_dir, ec)) fail(out_dir, ": already exists; quantize writes a new directory (remove it or choose another)");
  const std::string config_path = (fs::path(in_dir) / "config.json").string();
  const MonetConfig c = load_config(config_path);
  if (c.quant_block != 0) fail(config_path, ": the checkpoint is already quantized (quantization_config)");
  const std::unique_ptr<TensorStore> store = TensorStore::open_dir(in_dir);

  std::map<std::string, const TensorSpec*> specs;
  const std::vector<TensorSpec> table = tensor_table(c);
  for (const TensorSpec& t : table) specs[t.name] = &t;

  QuantizeSummary summary;
  std::vector<TensorToWrite> out;
  std::vector<QuantizedTensor> quantized;
  quantized.reserve(table.size());
  for (const std::string& name : store->names()) {
    const TensorInfo& t = store->get(name);
    summary.bytes_in += t.nbytes;
    auto it = specs.find(name);
    const TensorSpec* spec = it == specs.end() ? nullptr : it->second;
    const bool float_matrix = t.shape.size() == 2 && dtype_traits(t.dtype).to_f32 && dtype_traits(t.dtype).block_elems == 1;
    bool quantize = spec && float_matrix && quantized_role(spec->role, c.tie_word_embeddings);
    const int axis = spec ? quant_axis(spec->role) : 1;
    if (quantize && t.shape[size_t(axis)] % kQ8Block != 0) quantize = false;  // no whole blocks: kept as it is
    if (!quantize) {
      out.push_back({name, t.dtype, t.shape, t.data});
      summary.kept++;
      summary.bytes_out += t.nbytes;
      continue;
    }
    const int64_t rows = t.shape[0], cols = t.shape[1];
    std::vector<float> values(size_t(rows * cols));
    dtype_traits(t.dtype).to_f32(t.data, values.data(), rows * cols);
    quantized.push_back(quantize_matrix(values, rows, cols, axis));
    std::vector<int64_t> scale_shape = t.shape;
    scale_shape[size_t(axis)] /= kQ8Block;
    out.push_back({name, DType::I8, t.shape, quantized.back().q.data()});
    out.push_back({quant_scale_name(name), DType::F16, scale_shape, quantized.back().scale.data()});
    summary.quantized++;
    summary.bytes_out += quantized.back().q.size() + 2 * quantized.back().scale.size();
  }

  // config.json as it was (fields we do not model are kept) plus quantization_config.
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(read_file(config_path));
  } catch (const nlohmann::json::exception& e) {
    fail(config_path, ": not valid JSON (", e.what(), ")");
  }
  config["quantization_config"] = {{"quant_method", "monet_q8_0"}, {"block_size", kQ8Block}, {"scale_dtype", "F16"},
                                   {"weight_dtype", "I8"}, {"scale_suffix", "_scale"}};

  // Everything goes to a temporary directory first, renamed when complete.
  const std::string tmp = out_dir + ".tmp." + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    write_safetensors((fs::path(tmp) / "model.safetensors").string(), out,
                      {{"format", "pt"}, {"quantization", "monet_q8_0"}});
    write_file_atomic((fs::path(tmp) / "config.json").string(), config.dump(2) + "\n");
    for (const fs::directory_entry& e : fs::directory_iterator(in_dir)) {
      const std::string file = e.path().filename().string();
      if (!e.is_regular_file() || file == "config.json" || file == "model.safetensors.index.json" ||
          e.path().extension() == ".safetensors")
        continue;  // the tensors were rewritten above; subdirectories are not part of a model
      fs::copy_file(e.path(), fs::path(tmp) / file);
    }
    fs::rename(tmp, out_dir);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    fail(out_dir, ": writing the quantized checkpoint failed (", e.what(), ")");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return summary;
}

}  // namespace monet
