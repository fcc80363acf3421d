// torch.save files, read without unpickling anything: a zip reader for the
// stored (uncompressed) entries torch writes, and a pickle interpreter that
// knows exactly the opcodes and globals a dict of tensors needs.
//
// Layout (torch >= 1.6): <archive>/data.pkl holds the pickle; each tensor's
// storage is <archive>/data/<key>, raw little-endian elements; the pickle
// rebuilds a tensor as torch._utils._rebuild_tensor_v2(storage, offset,
// size, stride, requires_grad, backward_hooks), where the storage is a
// persistent id ('storage', torch.<Type>Storage, key, location, numel).
#include "monet/torch_checkpoint.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <unordered_map>

#include "monet/error.h"
#include "tokenizer/utf8.h"

namespace monet {

namespace {

// A string from the file as it may appear in a message: printable ASCII,
// other bytes as \xNN, at most 100 bytes.
std::string shown(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < 100; i++) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  return s.size() > 100 ? out + "..." : out;
}

// ------------------------------------------------------------------ zip ----

struct ZipEntry {
  uint64_t offset = 0;  // of the data, in the file
  uint64_t size = 0;
  uint32_t crc = 0;
};

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }
uint32_t rd32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }
uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | uint64_t(rd32(p + 4)) << 32; }

// The central directory: name -> stored entry. Every entry is checked
// (bounds, stored method, local header) but CRCs only when used.
std::map<std::string, ZipEntry> read_zip_directory(const uint8_t* f, size_t n, const std::string& path) {
  auto bad = [&](const auto&... parts) { fail(path, ": not a valid torch.save zip file: ", parts...); };
  if (n < 22) bad("only ", n, " bytes");
  // End of central directory: the last 22 bytes, or earlier when followed by a comment.
  size_t eocd = SIZE_MAX;
  const size_t lowest = n > 22 + 65535 ? n - 22 - 65535 : 0;
  for (size_t p = n - 22 + 1; p-- > lowest;) {
    if (rd32(f + p) == 0x06054b50 && p + 22 + rd16(f + p + 20) == n) {
      eocd = p;
      break;
    }
  }
  if (eocd == SIZE_MAX) bad("no end-of-central-directory record (truncated?)");
  uint64_t count = rd16(f + eocd + 10), cd_size = rd32(f + eocd + 12), cd_offset = rd32(f + eocd + 16);
  if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    // ZIP64: a locator just before the record points at the 64-bit record.
    if (eocd < 20 || rd32(f + eocd - 20) != 0x07064b50) bad("ZIP64 locator missing");
    const uint64_t z = rd64(f + eocd - 20 + 8);
    if (n < 56 || z > n - 56 || rd32(f + z) != 0x06064b50) bad("ZIP64 end record out of place");
    count = rd64(f + z + 32);
    cd_size = rd64(f + z + 40);
    cd_offset = rd64(f + z + 48);
  }
  if (cd_offset > n || cd_size > n - cd_offset) bad("central directory out of bounds (truncated?)");
  std::map<std::string, ZipEntry> entries;
  uint64_t p = cd_offset;
  const uint64_t cd_end = cd_offset + cd_size;
  for (uint64_t i = 0; i < count; i++) {
    if (p + 46 > cd_end || rd32(f + p) != 0x02014b50) bad("central directory entry ", i, " is corrupt");
    const uint16_t flags = rd16(f + p + 8), method = rd16(f + p + 10);
    const uint16_t name_len = rd16(f + p + 28), extra_len = rd16(f + p + 30), comment_len = rd16(f + p + 32);
    ZipEntry e;
    e.crc = rd32(f + p + 16);
    uint64_t csize = rd32(f + p + 20), usize = rd32(f + p + 24), local = rd32(f + p + 42);
    if (p + 46 + name_len + extra_len + comment_len > cd_end) bad("central directory entry ", i, " overruns");
    const std::string name(reinterpret_cast<const char*>(f + p + 46), name_len);
    // ZIP64 extended sizes/offset, in this order, only for the fields that overflowed.
    const uint8_t* x = f + p + 46 + name_len;
    for (const uint8_t* xe = x + extra_len; x + 4 <= xe;) {
      const uint16_t id = rd16(x), len = rd16(x + 2);
      if (x + 4 + len > xe) bad(shown(name), ": extra field overruns");
      if (id == 0x0001) {
        const uint8_t* v = x + 4;
        const uint8_t* ve = v + len;
        if (usize == 0xFFFFFFFF) { if (v + 8 > ve) bad(shown(name), ": ZIP64 field short"); usize = rd64(v); v += 8; }
        if (csize == 0xFFFFFFFF) { if (v + 8 > ve) bad(shown(name), ": ZIP64 field short"); csize = rd64(v); v += 8; }
        if (local == 0xFFFFFFFF) { if (v + 8 > ve) bad(shown(name), ": ZIP64 field short"); local = rd64(v); v += 8; }
      }
      x += 4 + len;
    }
    if (flags & 1) bad(shown(name), ": encrypted entry");
    if (method != 0)
      bad(shown(name), ": compressed entry (method ", method, "); torch.save writes stored entries only");
    if (csize != usize) bad(shown(name), ": stored entry with compressed size ", csize, " != size ", usize);
    if (n < 30 || local > n - 30 || rd32(f + local) != 0x04034b50) bad(shown(name), ": local header out of place");
    const uint64_t data = local + 30 + rd16(f + local + 26) + rd16(f + local + 28);
    if (data > n || usize > n - data) bad(shown(name), ": data out of bounds (truncated?)");
    e.offset = data;
    e.size = usize;
    if (!entries.emplace(name, e).second) bad("duplicate entry ", shown(name));
    p += 46 + name_len + extra_len + comment_len;
  }
  return entries;
}

void check_crc(const uint8_t* f, const ZipEntry& e, const std::string& path, const std::string& name) {
  uLong crc = crc32(0L, Z_NULL, 0);
  for (uint64_t done = 0; done < e.size;) {
    const uint64_t chunk = std::min<uint64_t>(e.size - done, 1u << 30);
    crc = crc32(crc, f + e.offset + done, uInt(chunk));
    done += chunk;
  }
  if (uint32_t(crc) != e.crc) fail(path, ": ", name, ": CRC mismatch (corrupt file)");
}

// --------------------------------------------------------------- pickle ----

enum class Kind { None, Bool, Int, Str, Tuple, Dict, Global, Storage, Tensor };
enum class Callable { OrderedDict, RebuildTensorV2, RebuildParameter, StorageType };

struct Value;
using Ref = std::shared_ptr<Value>;

struct Value {
  Kind kind = Kind::None;
  int64_t i = 0;                                // Int, Bool; Storage: numel
  std::string s;                                // Str; Storage: key
  std::vector<Ref> items;                       // Tuple
  std::vector<std::pair<Ref, Ref>> dict;        // Dict (ordered)
  Callable callable = Callable::OrderedDict;    // Global
  DType dtype = DType::F32;                     // Global StorageType, Storage, Tensor
  Ref storage;                                  // Tensor
  int64_t offset = 0;                           // Tensor: storage offset in elements
  std::vector<int64_t> shape, stride;           // Tensor
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Str: return "str";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
  }
  return "?";
}

Ref make(Kind k) {
  auto v = std::make_shared<Value>();
  v->kind = k;
  return v;
}

// The globals a checkpoint of tensors refers to; anything else is refused.
bool resolve_global(const std::string& module, const std::string& name, Value* out) {
  out->kind = Kind::Global;
  if (module == "collections" && name == "OrderedDict") { out->callable = Callable::OrderedDict; return true; }
  if (module == "torch._utils" && name == "_rebuild_tensor_v2") { out->callable = Callable::RebuildTensorV2; return true; }
  if (module == "torch._utils" && name == "_rebuild_parameter") { out->callable = Callable::RebuildParameter; return true; }
  if (module == "torch") {
    out->callable = Callable::StorageType;
    if (name == "FloatStorage") { out->dtype = DType::F32; return true; }
    if (name == "HalfStorage") { out->dtype = DType::F16; return true; }
    if (name == "BFloat16Storage") { out->dtype = DType::BF16; return true; }
  }
  return false;
}

class Unpickler {
 public:
  Unpickler(const uint8_t* p, size_t n, std::string where) : p_(p), n_(n), where_(std::move(where)) {}

  Ref run() {
    for (;;) {
      const size_t at = pos_;
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                         // PROTO
        case 0x95: take(8); break;                        // FRAME (protocol 4 framing)
        case '(': marks_.push_back(stack_.size()); break; // MARK
        case '.': {                                       // STOP
          if (stack_.size() != 1 || !marks_.empty()) bad(at, "STOP with a malformed stack");
          return stack_.back();
        }
        case 'N': push(make(Kind::None)); break;
        case 0x88: case 0x89: {                           // NEWTRUE, NEWFALSE
          Ref v = make(Kind::Bool);
          v->i = op == 0x88;
          push(v);
          break;
        }
        case 'K': push_int(byte()); break;                // BININT1
        case 'M': push_int(rd16(take(2))); break;         // BININT2
        case 'J': push_int(int32_t(rd32(take(4)))); break;  // BININT
        case 0x8a: {                                      // LONG1: little-endian two's complement
          const size_t len = byte();
          if (len > 8) bad(at, "integer of ", len, " bytes");
          const uint8_t* b = take(len);
          uint64_t u = 0;
          for (size_t k = 0; k < len; k++) u |= uint64_t(b[k]) << (8 * k);
          if (len > 0 && len < 8 && (b[len - 1] & 0x80)) u |= ~uint64_t(0) << (8 * len);
          push_int(int64_t(u));
          break;
        }
        case 'X': push_str(rd32(take(4))); break;         // BINUNICODE
        case 0x8c: push_str(byte()); break;               // SHORT_BINUNICODE
        case 0x8d: push_str(rd64(take(8))); break;        // BINUNICODE8
        case 'c': {                                       // GLOBAL "module\nname\n"
          const std::string module = line(), name = line();
          global(at, module, name);
          break;
        }
        case 0x93: {                                      // STACK_GLOBAL
          Ref name = pop(at), module = pop(at);
          if (module->kind != Kind::Str || name->kind != Kind::Str) bad(at, "STACK_GLOBAL of non-strings");
          global(at, module->s, name->s);
          break;
        }
        case ')': push(make(Kind::Tuple)); break;         // EMPTY_TUPLE
        case '}': push(make(Kind::Dict)); break;          // EMPTY_DICT
        case 't': {                                       // TUPLE
          Ref t = make(Kind::Tuple);
          t->items = pop_to_mark(at);
          push(t);
          break;
        }
        case 0x85: case 0x86: case 0x87: {                // TUPLE1..3
          Ref t = make(Kind::Tuple);
          t->items.resize(size_t(op - 0x84));
          for (size_t k = t->items.size(); k-- > 0;) t->items[k] = pop(at);
          push(t);
          break;
        }
        case 'q': memo_[byte()] = top(at); break;         // BINPUT
        case 'r': memo_[rd32(take(4))] = top(at); break;  // LONG_BINPUT
        case 0x94: memo_[uint32_t(memo_.size())] = top(at); break;  // MEMOIZE
        case 'h': push(memo(at, byte())); break;          // BINGET
        case 'j': push(memo(at, rd32(take(4)))); break;   // LONG_BINGET
        case 's': {                                       // SETITEM
          Ref v = pop(at), k = pop(at);
          dict_of(at, top(at))->dict.emplace_back(k, v);
          break;
        }
        case 'u': {                                       // SETITEMS
          std::vector<Ref> kv = pop_to_mark(at);
          if (kv.size() % 2) bad(at, "SETITEMS with an odd number of items");
          Ref d = dict_of(at, top(at));
          for (size_t k = 0; k < kv.size(); k += 2) d->dict.emplace_back(kv[k], kv[k + 1]);
          break;
        }
        case 'Q': push(persistent(at, pop(at))); break;   // BINPERSID
        case 'R': {                                       // REDUCE
          Ref args = pop(at), fn = pop(at);
          push(reduce(at, fn, args));
          break;
        }
        case 'b': {                                       // BUILD: state of an OrderedDict (state_dict's _metadata)
          pop(at);
          if (top(at)->kind != Kind::Dict) bad(at, "BUILD on a ", kind_name(top(at)->kind), " (only dicts)");
          break;
        }
        default:
          bad(at, "pickle opcode 0x", hex(op), " is not part of a tensor checkpoint (refused: objects are never built)");
      }
      if (stack_.size() > kMaxStack || memo_.size() > kMaxStack) bad(at, "pickle stack or memo too large");
    }
  }

 private:
  static constexpr size_t kMaxStack = 1u << 20;
  const uint8_t* p_;
  size_t n_, pos_ = 0;
  std::string where_;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, Ref> memo_;

  template <class... Parts>
  [[noreturn]] void bad(size_t at, const Parts&... parts) const {
    fail(where_, " (byte ", at, "): ", parts...);
  }
  static std::string hex(uint8_t b) {
    const char* d = "0123456789abcdef";
    return std::string{d[b >> 4], d[b & 15]};
  }
  const uint8_t* take(uint64_t k) {
    if (k > n_ - pos_) bad(pos_, "pickle ends early");
    const uint8_t* q = p_ + pos_;
    pos_ += size_t(k);
    return q;
  }
  uint8_t byte() { return *take(1); }
  std::string line() {
    const size_t start = pos_;
    while (pos_ < n_ && p_[pos_] != '\n') pos_++;
    if (pos_ >= n_) bad(start, "pickle ends inside a GLOBAL");
    return std::string(reinterpret_cast<const char*>(p_ + start), pos_++ - start);
  }
  void push(Ref v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t i) {
    Ref v = make(Kind::Int);
    v->i = i;
    push(v);
  }
  void push_str(uint64_t len) {
    Ref v = make(Kind::Str);
    const size_t at = pos_;
    const uint8_t* b = take(len);
    v->s.assign(reinterpret_cast<const char*>(b), size_t(len));
    if (!utf8::is_valid(v->s)) bad(at, "string is not valid UTF-8");
    push(v);
  }
  Ref top(size_t at) {
    if (stack_.empty() || (!marks_.empty() && marks_.back() == stack_.size())) bad(at, "pickle stack underflow");
    return stack_.back();
  }
  Ref pop(size_t at) {
    Ref v = top(at);
    stack_.pop_back();
    return v;
  }
  std::vector<Ref> pop_to_mark(size_t at) {
    if (marks_.empty()) bad(at, "no MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(stack_.begin() + std::ptrdiff_t(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  Ref memo(size_t at, uint32_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) bad(at, "memo ", k, " is unset");
    return it->second;
  }
  Ref dict_of(size_t at, Ref v) {
    if (v->kind != Kind::Dict) bad(at, "SETITEM on a ", kind_name(v->kind));
    return v;
  }
  void global(size_t at, const std::string& module, const std::string& name) {
    Ref g = make(Kind::Global);
    if (!resolve_global(module, name, g.get()))
      bad(at, "refusing global ", shown(module), ".", shown(name),
          " (only tensors of float32/float16/bfloat16 in dicts are read; no other object is ever built)");
    push(g);
  }
  Ref persistent(size_t at, const Ref& pid) {
    // ('storage', torch.<Type>Storage, key, location, numel)
    const auto& t = pid->items;
    if (pid->kind != Kind::Tuple || t.size() != 5 || t[0]->kind != Kind::Str || t[0]->s != "storage" ||
        t[1]->kind != Kind::Global || t[1]->callable != Callable::StorageType || t[2]->kind != Kind::Str ||
        t[3]->kind != Kind::Str || t[4]->kind != Kind::Int || t[4]->i < 0)
      bad(at, "persistent id is not a tensor storage record");
    Ref s = make(Kind::Storage);
    s->dtype = t[1]->dtype;
    s->s = t[2]->s;
    s->i = t[4]->i;
    return s;
  }
  static bool int_tuple(const Ref& v) {
    if (v->kind != Kind::Tuple) return false;
    for (const Ref& x : v->items)
      if (x->kind != Kind::Int || x->i < 0) return false;
    return true;
  }
  Ref reduce(size_t at, const Ref& fn, const Ref& args) {
    if (fn->kind != Kind::Global || args->kind != Kind::Tuple) bad(at, "REDUCE of a ", kind_name(fn->kind));
    const auto& a = args->items;
    switch (fn->callable) {
      case Callable::OrderedDict:
        if (!a.empty()) bad(at, "OrderedDict with arguments");
        return make(Kind::Dict);
      case Callable::RebuildTensorV2: {
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        if (a.size() < 6 || a.size() > 7 || a[0]->kind != Kind::Storage || a[1]->kind != Kind::Int || a[1]->i < 0 ||
            !int_tuple(a[2]) || !int_tuple(a[3]) || a[2]->items.size() != a[3]->items.size() ||
            a[4]->kind != Kind::Bool || a[5]->kind != Kind::Dict || !a[5]->dict.empty() ||
            (a.size() == 7 && !(a[6]->kind == Kind::None || (a[6]->kind == Kind::Dict && a[6]->dict.empty()))))
          bad(at, "_rebuild_tensor_v2 with unexpected arguments (hooks or metadata are not supported)");
        Ref t = make(Kind::Tensor);
        t->storage = a[0];
        t->dtype = a[0]->dtype;
        t->offset = a[1]->i;
        for (const Ref& x : a[2]->items) t->shape.push_back(x->i);
        for (const Ref& x : a[3]->items) t->stride.push_back(x->i);
        return t;
      }
      case Callable::RebuildParameter:
        // (data, requires_grad, backward_hooks): the tensor itself
        if (a.size() != 3 || a[0]->kind != Kind::Tensor || a[1]->kind != Kind::Bool || a[2]->kind != Kind::Dict ||
            !a[2]->dict.empty())
          bad(at, "_rebuild_parameter with unexpected arguments");
        return a[0];
      case Callable::StorageType:
        bad(at, "a storage type called as a function");
    }
    bad(at, "unknown callable");
  }
};

}  // namespace

TorchCheckpoint::TorchCheckpoint(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  map_size_ = size_t(st.st_size);
  if (map_size_ == 0) {
    ::close(fd);
    fail(path, ": empty file, expected a torch.save checkpoint");
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(path, ": cannot mmap (", std::strerror(errno), ")");
  }
  try {
    const uint8_t* f = static_cast<const uint8_t*>(map_);
    if (map_size_ >= 2 && f[0] == 0x80 && f[1] <= 5)
      fail(path, ": legacy (pre-zip, torch < 1.6) torch.save format is not supported; re-save it with a recent torch");
    if (map_size_ < 4 || rd32(f) != 0x04034b50) fail(path, ": not a torch.save checkpoint (not a zip file)");
    const auto entries = read_zip_directory(f, map_size_, path);

    // The archive's folder: the one entry named <folder>/data.pkl.
    std::string prefix;
    int pickles = 0;
    for (const auto& [name, e] : entries) {
      if (name == "data.pkl" || (name.size() > 9 && name.compare(name.size() - 9, 9, "/data.pkl") == 0)) {
        prefix = name.substr(0, name.size() - 8);
        pickles++;
      }
    }
    if (pickles != 1) fail(path, ": expected one data.pkl in the archive, found ", pickles);
    if (auto it = entries.find(prefix + "byteorder"); it != entries.end()) {
      const std::string order(reinterpret_cast<const char*>(f + it->second.offset), size_t(it->second.size));
      if (order != "little") fail(path, ": byteorder '", shown(order), "' is not supported (little-endian only)");
    }
    const ZipEntry& pkl = entries.at(prefix + "data.pkl");
    check_crc(f, pkl, path, prefix + "data.pkl");
    const Ref root = Unpickler(f + pkl.offset, size_t(pkl.size), path + ": " + prefix + "data.pkl").run();
    if (root->kind != Kind::Dict)
      fail(path, ": the checkpoint holds a value of type ", kind_name(root->kind), ", expected a dict of tensors");

    std::map<std::string, bool> crc_checked;
    for (const auto& [k, v] : root->dict) {
      if (k->kind != Kind::Str) fail(path, ": a key of the checkpoint's dict is a ", kind_name(k->kind), ", expected str");
      if (v->kind != Kind::Tensor) fail(path, ": ", shown(k->s), " is not a tensor (", kind_name(v->kind), "); expected a tensor");
      if (find(k->s)) fail(path, ": tensor ", shown(k->s), " appears twice");
      const Value& st_ = *v->storage;
      const std::string entry_name = prefix + "data/" + st_.s;
      auto it = entries.find(entry_name);
      if (it == entries.end()) fail(path, ": tensor ", shown(k->s), ": storage ", shown(entry_name), " is missing");
      const ZipEntry& e = it->second;
      const size_t esize = dtype_size(v->dtype);
      if (e.size != uint64_t(st_.i) * esize)
        fail(path, ": tensor ", shown(k->s), ": storage ", shown(entry_name), " has ", e.size, " bytes, expected ", st_.i, " x ",
             esize);
      if (!crc_checked[entry_name]) {
        check_crc(f, e, path, entry_name);
        crc_checked[entry_name] = true;
      }
      // Bounds: the last element the view reaches must lie in the storage.
      unsigned __int128 numel = 1, last = uint64_t(v->offset), contiguous_stride = 1;
      bool contiguous = true;
      for (size_t d = v->shape.size(); d-- > 0;) {
        numel *= uint64_t(v->shape[d]);
        if (v->shape[d] > 0) last += (unsigned __int128)uint64_t(v->shape[d] - 1) * uint64_t(v->stride[d]);
        if (v->shape[d] != 1 && uint64_t(v->stride[d]) != contiguous_stride) contiguous = false;
        contiguous_stride *= uint64_t(v->shape[d]);
        if (numel > (unsigned __int128)(uint64_t(1) << 48)) fail(path, ": tensor ", shown(k->s), ": shape too large");
      }
      if (numel > 0 && last >= (unsigned __int128)uint64_t(st_.i))
        fail(path, ": tensor ", shown(k->s), ": view (offset ", v->offset, ", shape ", shape_str(v->shape), ", stride ",
             shape_str(v->stride), ") reaches past its storage of ", st_.i, " elements");
      TensorInfo t;
      t.name = k->s;
      t.dtype = v->dtype;
      t.shape = v->shape;
      t.file = path;
      t.nbytes = size_t(numel) * esize;
      const uint8_t* base = f + e.offset;
      if (contiguous || numel == 0) {
        t.data = base + size_t(v->offset) * esize;
      } else {
        // Gather a strided view into row-major order.
        auto buf = std::make_unique<uint8_t[]>(t.nbytes);
        std::vector<int64_t> idx(v->shape.size(), 0);
        for (size_t i = 0; i < size_t(numel); i++) {
          int64_t src = v->offset;
          for (size_t d = 0; d < idx.size(); d++) src += idx[d] * v->stride[d];
          std::memcpy(buf.get() + i * esize, base + size_t(src) * esize, esize);
          for (size_t d = idx.size(); d-- > 0;) {
            if (++idx[d] < v->shape[d]) break;
            idx[d] = 0;
          }
        }
        t.data = buf.get();
        copies_.push_back(std::move(buf));
      }
      tensors_.push_back(std::move(t));
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

TorchCheckpoint::~TorchCheckpoint() {
  if (map_) ::munmap(map_, map_size_);
}

const TensorInfo* TorchCheckpoint::find(const std::string& name) const {
  for (const TensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

}  // namespace monet
