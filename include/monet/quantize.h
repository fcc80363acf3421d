// Block int8 checkpoints (docs/quantization.md): `monet quantize` writes one,
// Model::load reads it.
#pragma once
#include <cstdint>
#include <string>

namespace monet {

struct QuantizeSummary {
  int64_t quantized = 0;  // tensors stored as int8 + scales
  int64_t kept = 0;       // tensors copied as they were
  size_t bytes_in = 0, bytes_out = 0;  // tensor data read / written
};

// Writes the checkpoint directory in_dir to out_dir with the attention,
// expert and lm_head matrices as block int8 (type "q8_0": 32 values per
// block, one F16 scale each), config.json with a quantization_config entry,
// and every other file of in_dir (tokenizer, generation config) copied.
// out_dir must not exist; it is written as "<out_dir>.tmp.<pid>" and renamed,
// so a failure leaves nothing under out_dir (monet::Error says why).
QuantizeSummary quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, const std::string& type);

}  // namespace monet
