// PyTorch checkpoints (torch.save, zip format since torch 1.6) read safely:
// only a dict of name -> tensor is accepted, and the pickle is interpreted by
// a small machine that knows tensors, storages and (ordered) dicts and
// refuses every other global, so no object is ever constructed from the file.
// Used for LLaVA's mm_projector.bin.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "monet/safetensors.h"

namespace monet {

class TorchCheckpoint {
 public:
  // Opens and validates the whole file (zip directory, stored entries and
  // their CRCs, the pickle, every tensor's storage bounds). monet::Error
  // naming the file for anything else: another format, compressed entries, a
  // global that is not a tensor, storage types other than float/half/bfloat16.
  explicit TorchCheckpoint(const std::string& path);
  ~TorchCheckpoint();
  TorchCheckpoint(const TorchCheckpoint&) = delete;
  TorchCheckpoint& operator=(const TorchCheckpoint&) = delete;

  const std::string& path() const { return path_; }
  // In the file's order; data is contiguous row-major (strided tensors are
  // copied), valid while this object lives.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::vector<std::unique_ptr<uint8_t[]>> copies_;  // gathered non-contiguous tensors
};

}  // namespace monet
