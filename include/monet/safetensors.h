// safetensors files: memory-mapped reading (single file or a sharded
// checkpoint directory) and atomic writing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "monet/dtype.h"

namespace monet {

std::string shape_str(const std::vector<int64_t>& shape);  // "[2048, 512]"

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mapping; valid while the file is open
  size_t nbytes = 0;
  std::string file;               // path of the file holding it (for messages)

  int64_t numel() const;
  std::string shape_str() const;  // "[2048, 512]"
  // Element i of a float tensor (F64, F32, BF16, F16) as a double; Error for other dtypes.
  double element(size_t i) const;
};

// The tensors of a safetensors image in memory (`data` of each points into it).
struct SafetensorsImage {
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

// Validates a whole safetensors image of `size` bytes at `data` (header
// length, JSON, dtypes, shapes, offsets in bounds, no overlaps, byte counts
// matching shape x dtype), as SafetensorsFile does for a mapped file;
// monet::Error names `source`.
SafetensorsImage parse_safetensors(const uint8_t* data, size_t size, const std::string& source);

// One .safetensors file, mmap'd read-only. The constructor validates the whole
// header (size, JSON, dtypes, shapes, offsets in bounds, no overlaps, byte
// counts matching shape x dtype) and throws monet::Error naming the file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  static constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // as the HF library
  // Reads the whole file into the mapping with 2 MiB pages where the kernel
  // offers them: a file whose cached pages are small is dropped from the page
  // cache and read again (once: the cache then keeps 2 MiB pages). Returns
  // whether at least 7/8 of its whole 2 MiB blocks map in 2 MiB pages.
  bool map_huge_pages();
  size_t huge_page_bytes() const;  // bytes of the mapping in 2 MiB pages now

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: `model.safetensors`, or the shards
// listed by `model.safetensors.index.json` (weight_map). Every tensor named in
// the index must be present in its shard; a name present in two files is an error.
class TensorStore {
 public:
  static std::unique_ptr<TensorStore> open_dir(const std::string& dir);
  static std::unique_ptr<TensorStore> open_file(const std::string& path);

  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  const TensorInfo& get(const std::string& name) const;   // throws "<dir>: missing tensor <name>"
  std::vector<std::string> names() const;
  const std::string& source() const { return source_; }
  // Drops this process's resident pages of a tensor of the store
  // (MADV_DONTNEED on the 2 MiB blocks inside its bytes): the file's pages stay in the page
  // cache and a later read maps them again. For tensors the model reads from
  // a copy, so that they are not held twice.
  void release_pages(const TensorInfo& t) const;
  // SafetensorsFile::map_huge_pages (true: every file's) / huge_page_bytes over every file.
  bool map_huge_pages();
  size_t huge_page_bytes() const;

 private:
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> by_name_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // numel * dtype_size bytes
};

// Writes a safetensors file atomically: to "<path>.tmp.<pid>", fsync, rename.
// On any failure the temp file is removed and monet::Error is thrown; an
// existing file at `path` is left untouched.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Atomic write of a text/binary blob with the same temp+rename discipline.
void write_file_atomic(const std::string& path, const std::string& contents);

// The whole contents of a file; monet::Error "<path>: cannot open (reason)".
std::string read_file(const std::string& path);

}  // namespace monet
