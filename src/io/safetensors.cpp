#include "monet/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/huge_pages.h"
#include "monet/error.h"

namespace monet {

namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string TensorInfo::shape_str() const { return monet::shape_str(shape); }

double TensorInfo::element(size_t i) const {
  const uint8_t* p = data + i * dtype_size(dtype);
  switch (dtype) {
    case DType::F64: { double v; std::memcpy(&v, p, 8); return v; }
    case DType::F32: { float v; std::memcpy(&v, p, 4); return v; }
    case DType::BF16: { uint16_t v; std::memcpy(&v, p, 2); return bf16_to_f32(v); }
    case DType::F16: { uint16_t v; std::memcpy(&v, p, 2); return f16_to_f32(v); }
    default: fail(file, ": tensor ", name, " has dtype ", dtype_name(dtype), ", expected a float type");
  }
}

std::string read_file(const std::string& path) {
  // A directory opens fine as a stream and then reads as empty; say what it is.
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail(path, ": cannot open (is a directory)");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open (", std::strerror(errno), ")");
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(path, ": read failed");
  return ss.str();
}

SafetensorsImage parse_safetensors(const uint8_t* base, size_t size, const std::string& path) {
  if (size < 8) fail(path, ": not a safetensors file: ", size, " bytes, shorter than the 8-byte header length");
  SafetensorsImage image;
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian u64, as on x86-64 and aarch64
  if (header_len > SafetensorsFile::kMaxHeaderBytes)
    fail(path, ": header length ", header_len, " exceeds the limit of ", SafetensorsFile::kMaxHeaderBytes, " bytes");
  if (header_len > size - 8)
    fail(path, ": truncated: header length ", header_len, " but the file has only ", size - 8,
         " bytes after the length field");
  json header;
  try {
    header = json::parse(base + 8, base + 8 + header_len);
  } catch (const json::exception& e) {
    fail(path, ": header is not valid JSON (", e.what(), ")");
  }
  if (!header.is_object()) fail(path, ": header must be a JSON object");
  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(path, ": __metadata__ must be an object of strings");
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) fail(path, ": __metadata__[\"", k, "\"] must be a string");
        image.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) fail(path, ": tensor ", name, ": entry must be an object");
    if (!entry.contains("dtype") || !entry["dtype"].is_string())
      fail(path, ": tensor ", name, ": missing string field \"dtype\"");
    if (!entry.contains("shape") || !entry["shape"].is_array())
      fail(path, ": tensor ", name, ": missing array field \"shape\"");
    if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2)
      fail(path, ": tensor ", name, ": \"data_offsets\" must be [begin, end]");
    TensorInfo t;
    t.name = name;
    t.file = path;
    const std::string dt = entry["dtype"].get<std::string>();
    if (!dtype_from_name(dt, &t.dtype)) fail(path, ": tensor ", name, ": unknown dtype \"", dt, "\"");
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        fail(path, ": tensor ", name, ": shape entries must be non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim)
        fail(path, ": tensor ", name, ": shape is too large");
      numel *= dim;
      t.shape.push_back(int64_t(dim));
    }
    const auto& off = entry["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(path, ": tensor ", name, ": data_offsets must be non-negative integers");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end) fail(path, ": tensor ", name, ": data_offsets [", begin, ", ", end, "] has begin > end");
    if (end > data_size)
      fail(path, ": truncated: tensor ", name, " needs bytes [", begin, ", ", end, ") but the data section has ",
           data_size, " bytes");
    const uint64_t expected = numel * dtype_size(t.dtype);
    if (end - begin != expected)
      fail(path, ": tensor ", name, ": ", end - begin, " bytes for shape ", t.shape_str(), " of ", dt,
           ", expected ", expected);
    t.data = data + begin;
    t.nbytes = size_t(end - begin);
    image.tensors.push_back(std::move(t));
  }
  // Tensors may not share bytes. Ties on the start put empty tensors first:
  // writers give an empty tensor the same offset as the next one.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : image.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->data != b->data ? a->data < b->data : a->nbytes < b->nbytes;
  });
  for (size_t i = 1; i < by_offset.size(); i++) {
    const TensorInfo* prev = by_offset[i - 1];
    if (prev->data + prev->nbytes > by_offset[i]->data)
      fail(path, ": tensors ", prev->name, " and ", by_offset[i]->name, " overlap in the data section");
  }
  return image;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, ": cannot stat (", std::strerror(errno), ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  map_size_ = size_t(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    fail(path, ": not a safetensors file: ", map_size_, " bytes, shorter than the 8-byte header length");
  }
  // 2 MiB aligned: the page cache's 2 MiB folios of the file map whole (core/huge_pages.h).
  map_ = map_file_huge(fd, map_size_);
  const int map_errno = errno;
  ::close(fd);
  if (!map_) fail(path, ": cannot mmap (", std::strerror(map_errno), ")");
  try {
    SafetensorsImage image = parse_safetensors(static_cast<const uint8_t*>(map_), map_size_, path);
    tensors_ = std::move(image.tensors);
    metadata_ = std::move(image.metadata);
    for (size_t i = 0; i < tensors_.size(); i++) index_[tensors_[i].name] = i;
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

bool SafetensorsFile::map_huge_pages() {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t whole = map_size_ / kHuge * kHuge;  // the mapping starts 2 MiB aligned
  if (whole == 0) return true;
  if (!huge_pages_available()) return false;
  populate_mapping(map_, map_size_);
  auto mostly_huge = [&] { return huge_mapped_bytes(map_) >= whole - whole / 8; };
  if (mostly_huge()) return true;
  // Cached in small pages (written in small pieces, say): drop this
  // mapping's pages and the file's unmapped clean cache, then read the file
  // again: the faults of a MADV_HUGEPAGE mapping read 2 MiB folios. The page
  // cache keeps them for later loads, of this process or any other. Where
  // no block maps whole yet, the first block is tried alone: a file system
  // or kernel without 2 MiB file pages costs one block read, not the file.
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  // (A file written just now has dirty pages, which the page cache keeps: written out first.)
  ::fdatasync(fd);
  auto reread = [&](size_t bytes) {
    ::madvise(map_, bytes, MADV_DONTNEED);
    ::posix_fadvise(fd, 0, off_t(bytes), POSIX_FADV_DONTNEED);
    populate_mapping(map_, bytes);
  };
  if (huge_mapped_bytes(map_) == 0) reread(kHuge);
  if (huge_mapped_bytes(map_) > 0) reread(map_size_);
  ::close(fd);
  return mostly_huge();
}

size_t SafetensorsFile::huge_page_bytes() const { return huge_mapped_bytes(map_); }

bool TensorStore::map_huge_pages() {
  bool all = true;
  for (auto& f : files_) all = f->map_huge_pages() && all;
  return all;
}

size_t TensorStore::huge_page_bytes() const {
  size_t bytes = 0;
  for (const auto& f : files_) bytes += f->huge_page_bytes();
  return bytes;
}

void TensorStore::release_pages(const TensorInfo& t) const {
  // Private read-only file mappings: their pages were never written, so they
  // come back from the file unchanged. Only the 2 MiB blocks inside the
  // tensor: dropping part of a block would split its 2 MiB mapping, which a
  // neighbouring tensor read in place may use.
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data) + t.nbytes) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::unique_ptr<TensorStore> TensorStore::open_file(const std::string& path) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->source_ = path;
  store->files_.push_back(std::make_unique<SafetensorsFile>(path));
  for (const auto& t : store->files_.back()->tensors()) store->by_name_[t.name] = &t;
  return store;
}

std::unique_ptr<TensorStore> TensorStore::open_dir(const std::string& dir) {
  // error_code overloads: a permission problem must become monet::Error too.
  std::error_code ec;
  const fs::file_status dir_status = fs::status(dir, ec);
  if (!fs::exists(dir_status)) fail(dir, ": no such checkpoint directory");
  if (!fs::is_directory(dir_status)) fail(dir, ": not a directory (expected a checkpoint directory)");
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  if (!fs::exists(index_path, ec)) {
    if (!fs::exists(single_path, ec)) fail(dir, ": no model.safetensors or model.safetensors.index.json");
    auto store = open_file(single_path.string());
    store->source_ = dir;
    return store;
  }
  json index;
  try {
    index = json::parse(read_file(index_path.string()));
  } catch (const json::exception& e) {
    fail(index_path.string(), ": not valid JSON (", e.what(), ")");
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail(index_path.string(), ": missing object \"weight_map\"");
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->source_ = dir;
  std::map<std::string, SafetensorsFile*> shards;
  for (auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string()) fail(index_path.string(), ": weight_map[\"", name, "\"] must be a file name");
    const std::string shard = file.get<std::string>();
    if (shard.find('/') != std::string::npos || shard == "..")
      fail(index_path.string(), ": weight_map[\"", name, "\"] = \"", shard, "\" must name a file in the directory");
    if (!shards.count(shard)) {
      const fs::path shard_path = fs::path(dir) / shard;
      if (!fs::exists(shard_path, ec))
        fail(index_path.string(), ": shard ", shard, " (holding ", name, ") does not exist");
      store->files_.push_back(std::make_unique<SafetensorsFile>(shard_path.string()));
      shards[shard] = store->files_.back().get();
    }
    const TensorInfo* t = shards[shard]->find(name);
    if (!t) fail((fs::path(dir) / shard).string(), ": tensor ", name, " listed in the index is missing from this shard");
  }
  for (const auto& f : store->files_)
    for (const auto& t : f->tensors()) {
      auto [it, inserted] = store->by_name_.emplace(t.name, &t);
      if (!inserted) fail(dir, ": tensor ", t.name, " appears in both ", it->second->file, " and ", t.file);
    }
  return store;
}

const TensorInfo* TensorStore::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorInfo& TensorStore::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail(source_, ": missing tensor ", name);
  return *t;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : by_name_) out.push_back(name);
  return out;
}

namespace {

// Product of the dims times the element size; monet::Error on a negative dim
// or when the byte count does not fit in 64 bits.
uint64_t tensor_bytes(const std::string& path, const TensorToWrite& t) {
  uint64_t bytes = dtype_size(t.dtype);
  for (int64_t d : t.shape) {
    if (d < 0) fail(path, ": tensor ", t.name, " has a negative dimension");
    if (d != 0 && bytes > std::numeric_limits<uint64_t>::max() / uint64_t(d))
      fail(path, ": tensor ", t.name, ": shape is too large");
    bytes *= uint64_t(d);
  }
  return bytes;
}

// fsync of the directory makes the rename itself durable. Best effort: the
// new file is already in place, so a failure here is not reported.
void sync_parent_dir(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) parent = ".";
  const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return;
  ::fsync(dfd);
  ::close(dfd);
}

// Writes `fill` output to path via a temp file + fsync + rename.
template <class Fill>
void write_atomic(const std::string& path, Fill fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, ": cannot create (", std::strerror(errno), ")");
  auto write_all = [&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd, c, std::min(n, size_t(1) << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail(path, ": write failed (", std::strerror(errno), ")");
      }
      c += w;
      n -= size_t(w);
    }
  };
  try {
    fill(write_all);
    if (::fsync(fd) != 0) fail(path, ": fsync failed (", std::strerror(errno), ")");
    const int rc = ::close(fd);
    fd = -1;  // closed even when close() reports an error: never close it twice
    if (rc != 0) fail(path, ": close failed (", std::strerror(errno), ")");
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail(path, ": rename failed (", std::strerror(err), ")");
  }
  sync_parent_dir(path);
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) fail(path, ": tensor ", t.name, " given twice");
    if (t.name == "__metadata__") fail(path, ": \"__metadata__\" is not a tensor name");
    const uint64_t bytes = tensor_bytes(path, t);
    if (bytes > std::numeric_limits<uint64_t>::max() - offset) fail(path, ": total tensor size is too large");
    if (bytes > 0 && !t.data) fail(path, ": tensor ", t.name, " has no data");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string head;
  try {
    head = header.dump();
  } catch (const json::exception& e) {  // names or metadata that are not UTF-8
    fail(path, ": cannot encode the header (", e.what(), ")");
  }
  head.append((8 - head.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  if (head.size() > SafetensorsFile::kMaxHeaderBytes)
    fail(path, ": header of ", head.size(), " bytes exceeds the limit of ", SafetensorsFile::kMaxHeaderBytes, " bytes");
  write_atomic(path, [&](auto write_all) {
    const uint64_t n = head.size();
    write_all(&n, 8);
    write_all(head.data(), head.size());
    for (const auto& t : tensors) write_all(t.data, tensor_bytes(path, t));
  });
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomic(path, [&](auto write_all) { write_all(contents.data(), contents.size()); });
}

}  // namespace monet
