// `monet train`: data cache, AdamW with warm-up + cosine, gradient clipping
// and accumulation, validation, atomic checkpoints and exact resume
// (docs/training.md). The model math is in train_model.cpp.
#include <signal.h>

#include <cerrno>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "core/threads.h"
#include "monet/comm.h"
#include "model/tensor_table.h"
#include "monet/error.h"
#include "monet/safetensors.h"
#include "monet/tokenizer.h"
#include "monet/train.h"
#include "train/train_model.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace monet {
namespace {

using train::Losses;
using train::ParamInfo;
using train::StepOptions;
using train::TrainModel;
using train::splitmix64;

// Progress comes from rank 0 alone (the other ranks of a distributed run are silent).
bool is_root(const TrainOptions& o) { return !o.comm || o.comm->rank() == 0; }

void message(const TrainOptions& o, const std::string& text) {
  if (o.on_message && is_root(o)) o.on_message(text);
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

const char* kTokenizerFiles[] = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                 "special_tokens_map.json", "generation_config.json"};

// The released Monet modeling code (modeling_monet.py, VD and HD) on the
// Hugging Face hub: checkpoints point their auto_map at it ("repo--module.Class"),
// so that AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
// loads them as it loads the released ones, with no code in the folder.
const char* kMonetCodeRepo = "MonetLLM/monet-vd-1.4B-100BT-hf";

// What a checkpoint needs to load in transformers with trust_remote_code: an
// auto_map naming the modeling code and the code files it names locally.
struct HfCode {
  json auto_map;
  std::vector<fs::path> module_files;  // copied beside config.json
};

// The auto_map of the checkpoint a run starts from (--init, --resume) is
// kept, with the local modules it names ("modeling_monet.MonetConfig", as the
// released checkpoints have) copied along, as save_pretrained does; without
// one, or when a module it names is missing, the hub's code.
HfCode hf_code_of(const std::string& config_dir) {
  HfCode code;
  const std::string repo = kMonetCodeRepo;
  code.auto_map = {{"AutoConfig", repo + "--modeling_monet.MonetConfig"},
                   {"AutoModelForCausalLM", repo + "--modeling_monet.MonetForCausalLM"}};
  if (config_dir.empty()) return code;
  const std::string path = (fs::path(config_dir) / "config.json").string();
  json cfg;
  try {
    cfg = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
  if (!cfg.is_object() || !cfg.contains("auto_map") || !cfg["auto_map"].is_object()) return code;
  std::vector<fs::path> files;
  bool complete = true;
  for (const auto& [key, value] : cfg["auto_map"].items()) {
    std::vector<json> refs = value.is_array() ? std::vector<json>(value.begin(), value.end()) : std::vector<json>{value};
    for (const json& ref : refs) {
      if (!ref.is_string()) continue;  // e.g. null for a tokenizer class without a fast variant
      const std::string name = ref.get<std::string>();
      if (name.find("--") != std::string::npos) continue;  // code in another repository
      const fs::path module = fs::path(config_dir) / (name.substr(0, name.find('.')) + ".py");
      if (!fs::exists(module)) complete = false;
      else if (std::find(files.begin(), files.end(), module) == files.end()) files.push_back(module);
    }
  }
  if (!complete) return code;
  code.auto_map = cfg["auto_map"];
  code.module_files = files;
  return code;
}

// ------------------------------------------------------------ tensors

using TensorLookup = std::function<const TensorInfo&(const std::string& name)>;

template <class R>
void read_into(const TensorInfo& t, const std::vector<int64_t>& shape, R* out) {
  if (t.shape != shape) fail(t.file, ": tensor ", t.name, " has shape ", t.shape_str(), ", expected ", shape_str(shape));
  for (size_t i = 0; i < size_t(t.numel()); i++) out[i] = R(t.element(i));
}

// side 0 / 1: router.norm1 / norm2
std::string norm_name(int64_t layer, int side, const char* stat) { return router_norm_name(layer, side + 1, stat); }

// BatchNorm running stats of every router from tensors named prefix + HF name.
template <class R>
void read_running_stats(TrainModel<R>& m, const TensorLookup& get, const std::string& prefix) {
  const MonetConfig& c = m.config();
  const int64_t H = c.moe_heads;
  for (int64_t r = 0; r < c.num_router_layers(); r++)
    for (int side = 0; side < 2; side++) {
      const int64_t l = r * c.moe_groups;
      read_into(get(prefix + norm_name(l, side, "running_mean")), {H}, m.running_mean[r].data() + side * H);
      read_into(get(prefix + norm_name(l, side, "running_var")), {H}, m.running_var[r].data() + side * H);
    }
}

template <class R>
void load_weights(TrainModel<R>& m, const std::string& dir) {
  auto store = TensorStore::open_dir(dir);
  const TensorLookup get = [&](const std::string& name) -> const TensorInfo& { return store->get(name); };
  for (const ParamInfo& p : m.layout().params) read_into(get(p.name), p.shape, m.params.data() + p.offset);
  read_running_stats(m, get, "");
}

// Owns converted tensor bytes until write_safetensors has run.
struct TensorBuffers {
  std::vector<TensorToWrite> tensors;
  std::vector<std::vector<uint8_t>> storage;

  template <class T>
  void add(const std::string& name, std::vector<int64_t> shape, const T* src, size_t n, DType dtype) {
    std::vector<uint8_t> bytes(n * dtype_size(dtype));
    for (size_t i = 0; i < n; i++) {
      const double v = double(src[i]);
      uint8_t* p = bytes.data() + i * dtype_size(dtype);
      if (dtype == DType::F64) std::memcpy(p, &v, 8);
      else if (dtype == DType::F32) { const float f = float(v); std::memcpy(p, &f, 4); }
      else if (dtype == DType::BF16) { const uint16_t h = f32_to_bf16(float(v)); std::memcpy(p, &h, 2); }
      else fail("internal: cannot write dtype ", dtype_name(dtype));
    }
    storage.push_back(std::move(bytes));
    tensors.push_back({name, dtype, std::move(shape), storage.back().data()});
  }
  void add_i64(const std::string& name, int64_t v) {
    std::vector<uint8_t> bytes(8);
    std::memcpy(bytes.data(), &v, 8);
    storage.push_back(std::move(bytes));
    tensors.push_back({name, DType::I64, {}, storage.back().data()});
  }
};

template <class R>
void add_running_stats(TensorBuffers& tb, const TrainModel<R>& m, DType dtype, const std::string& prefix,
                       int64_t batches_tracked) {
  const MonetConfig& c = m.config();
  const int64_t H = c.moe_heads;
  for (int64_t r = 0; r < c.num_router_layers(); r++)
    for (int side = 0; side < 2; side++) {
      const int64_t l = r * c.moe_groups;
      tb.add(prefix + norm_name(l, side, "running_mean"), {H}, m.running_mean[r].data() + side * H, size_t(H), dtype);
      tb.add(prefix + norm_name(l, side, "running_var"), {H}, m.running_var[r].data() + side * H, size_t(H), dtype);
      if (batches_tracked >= 0) tb.add_i64(norm_name(l, side, "num_batches_tracked"), batches_tracked);
    }
}

// ------------------------------------------------------------ data

struct Corpus {
  std::vector<uint32_t> train, val;
};

std::vector<fs::path> list_text_files(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, ": no such file or directory (--data)");
  if (!fs::is_directory(path, ec)) return {fs::path(path)};
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(path, ec))
    if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
  if (ec) fail(path, ": cannot list the folder (", ec.message(), ")");
  std::sort(files.begin(), files.end());
  if (files.empty()) fail(path, ": no .txt files in the folder (--data)");
  return files;
}

json file_stamp(const fs::path& p) {
  std::error_code ec;
  const auto size = fs::file_size(p, ec);
  const auto mtime = fs::last_write_time(p, ec).time_since_epoch().count();
  return json{{"path", fs::absolute(p).string()}, {"size", ec ? 0 : size}, {"mtime", int64_t(mtime)}};
}

std::vector<uint32_t> read_tokens(const std::string& path) {
  const std::string bytes = read_file(path);
  if (bytes.size() % 4) fail(path, ": token cache size is not a multiple of 4 bytes (delete it to rebuild)");
  std::vector<uint32_t> out(bytes.size() / 4);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

std::string token_bytes(const std::vector<uint32_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

// Tokenizes the corpus once into OUT/data/{train,val}.bin; reuses the cache
// while the source files, tokenizer and split are unchanged.
Corpus prepare_data(const TrainOptions& o, const Tokenizer& tok) {
  const std::vector<fs::path> files = list_text_files(o.data);
  json meta{{"format", "monet-token-cache-1"}, {"val_fraction", o.val_fraction}, {"files", json::array()},
            {"tokenizer", json::array()}};
  for (const fs::path& f : files) meta["files"].push_back(file_stamp(f));
  for (const char* name : kTokenizerFiles)
    if (fs::exists(fs::path(o.tokenizer) / name)) meta["tokenizer"].push_back(file_stamp(fs::path(o.tokenizer) / name));
  const fs::path dir = fs::path(o.out) / "data";
  const fs::path meta_path = dir / "meta.json";
  Corpus corpus;
  std::error_code ec;
  if (fs::exists(meta_path, ec)) {
    json old;
    try {
      old = json::parse(read_file(meta_path.string()));
    } catch (const json::exception&) {
    }
    if (old.is_object()) old.erase("counts");  // an unreadable meta.json just means: rebuild
    if (old == meta) {
      corpus.train = read_tokens((dir / "train.bin").string());
      corpus.val = read_tokens((dir / "val.bin").string());
      message(o, "data: " + std::to_string(corpus.train.size()) + " train + " + std::to_string(corpus.val.size()) +
                     " validation tokens (cached in " + dir.string() + ")");
      return corpus;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<uint32_t>> docs(files.size());
  size_t bytes = 0;
  for (const fs::path& f : files) bytes += fs::file_size(f, ec);
  message(o, "data: tokenizing " + std::to_string(files.size()) + " file(s), " + fixed(double(bytes) / 1e6, 1) + " MB ...");
  std::string error;
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < files.size(); i++) {
    try {
      const std::string text = read_file(files[i].string());
      std::vector<uint32_t>& d = docs[i];
      if (tok.bos_id() >= 0) d.push_back(uint32_t(tok.bos_id()));
      for (int32_t id : tok.encode(text, false)) d.push_back(uint32_t(id));
      if (tok.eos_id() >= 0) d.push_back(uint32_t(tok.eos_id()));
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) fail(error);
  for (const auto& d : docs) {
    const size_t n_val = size_t(double(d.size()) * o.val_fraction);
    corpus.train.insert(corpus.train.end(), d.begin(), d.end() - ptrdiff_t(n_val));
    corpus.val.insert(corpus.val.end(), d.end() - ptrdiff_t(n_val), d.end());
  }
  fs::create_directories(dir, ec);
  if (ec) fail(dir.string(), ": cannot create the folder (", ec.message(), ")");
  write_file_atomic((dir / "train.bin").string(), token_bytes(corpus.train));
  write_file_atomic((dir / "val.bin").string(), token_bytes(corpus.val));
  meta["counts"] = {{"train", corpus.train.size()}, {"val", corpus.val.size()}};
  write_file_atomic(meta_path.string(), meta.dump(2) + "\n");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  message(o, "data: " + std::to_string(corpus.train.size()) + " train + " + std::to_string(corpus.val.size()) +
                 " validation tokens in " + fixed(secs, 1) + " s (" + fixed(double(bytes) / 1e6 / secs, 2) + " MB/s)");
  return corpus;
}

// ------------------------------------------------------------ schedule, optimiser

double learning_rate(const TrainOptions& o, int64_t step) {
  const double warmup = o.warmup;
  if (step < warmup) return o.lr * double(step + 1) / warmup;
  const double lr_min = o.lr * o.min_lr_ratio;
  const double p = std::min(1.0, (double(step) - warmup) / std::max(1.0, double(o.steps - 1) - warmup));
  return lr_min + 0.5 * (o.lr - lr_min) * (1.0 + std::cos(M_PI * p));
}

// The moments of the flat parameters [lo, lo + m.size()): all of them, or
// one rank's shard under ZeRO-1 (--zero1).
template <class R>
struct AdamW {
  size_t lo = 0;
  std::vector<R> m, v;
  explicit AdamW(const train::ParamLayout& layout) : m(layout.total, R(0)), v(layout.total, R(0)) {}
  AdamW(size_t lo_, std::vector<R> m_, std::vector<R> v_) : lo(lo_), m(std::move(m_)), v(std::move(v_)) {}
  // torch.optim.AdamW, step t (1-based), same operation order; weight decay
  // on the parameters the layout marks (weight matrices). g[i - lo] is the
  // gradient of w[i].
  void update(const train::ParamLayout& layout, R* w, const R* g, const TrainOptions& o, double lr, int64_t t) {
    const R b1 = R(o.beta1), b2 = R(o.beta2);
    const double bc1 = 1.0 - std::pow(o.beta1, double(t)), bc2 = 1.0 - std::pow(o.beta2, double(t));
    const R step_size = R(lr / bc1), bc2_sqrt = R(std::sqrt(bc2)), eps = R(o.adam_eps);
    const R wd = R(1.0 - lr * o.weight_decay);
    const size_t hi = lo + m.size();
    R* mm = m.data() - lo;  // indexed like w
    R* vv = v.data() - lo;
    const R* gg = g - lo;
    for (const ParamInfo& p : layout.params) {
      const size_t begin = std::max(p.offset, lo), end = std::min(p.offset + p.numel, hi);
#pragma omp parallel for
      for (size_t i = begin; i < end; i++) {
        if (p.decay) w[i] *= wd;
        mm[i] += (gg[i] - mm[i]) * (R(1) - b1);
        vv[i] = vv[i] * b2 + gg[i] * gg[i] * (R(1) - b2);
        w[i] -= step_size * mm[i] / (std::sqrt(vv[i]) / bc2_sqrt + eps);
      }
    }
  }
};

// ------------------------------------------------------------ checkpoints

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%06lld", (long long)step);
  return buf;
}

// Completed checkpoints in `out`, oldest first (temporary dirs start with '.').
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const std::string& out) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  const std::regex re("step-([0-9]+)");
  for (const auto& e : fs::directory_iterator(out, ec)) {
    std::smatch mt;
    const std::string name = e.path().filename().string();
    if (e.is_directory() && std::regex_match(name, mt, re) && fs::exists(e.path() / "optimizer.safetensors"))
      found.push_back({std::stoll(mt[1]), e.path()});
  }
  std::sort(found.begin(), found.end());
  return found;
}

// Moves `dir` out of the step-* namespace (to .NAME.old-PID) before deleting it: a kill
// in mid-delete leaves a hidden leftover, never a step-* folder missing some files.
void discard_dir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  const fs::path old = dir.parent_path() / ("." + dir.filename().string() + ".old-" + std::to_string(getpid()));
  fs::remove_all(old, ec);
  fs::rename(dir, old, ec);
  if (!ec) fs::remove_all(old, ec);
}

// Deletes what killed runs left in `dir`: checkpoints being written (.step-N.tmp-PID) or
// deleted (.step-N.old-PID) and write_file_atomic's FILE.tmp.PID, if process PID is gone.
void remove_stale_temporaries(const fs::path& dir) {
  static const std::regex re(R"((\.step-[0-9]+\.(tmp|old)-|.+\.tmp\.)([0-9]{1,9}))");
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::smatch mt;
    const std::string name = e.path().filename().string();
    if (!std::regex_match(name, mt, re)) continue;
    const pid_t pid = pid_t(std::stol(mt[3]));
    if (pid != getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) stale.push_back(e.path());
  }
  for (const fs::path& p : stale) fs::remove_all(p, ec);
}

[[noreturn]] void fail_nothing_to_resume(const std::string& out) {
  fail(out, ": nothing to resume: no complete checkpoint (a step-N folder with optimizer.safetensors) there yet, "
       "e.g. the run stopped before its first save (--save-every); run the same command without --resume to start "
       "afresh");
}

struct RunState {
  int64_t step = 0;            // steps done
  uint64_t rng = 0;            // sampler state
  int64_t batches_tracked = 0; // BatchNorm micro-batches seen
};

DType parse_save_dtype(const std::string& s) {
  if (s == "F32" || s == "f32" || s == "float32") return DType::F32;
  if (s == "BF16" || s == "bf16" || s == "bfloat16") return DType::BF16;
  fail("--save-dtype must be f32 or bf16, got '", s, "'");
}

template <class R>
void save_checkpoint(const TrainOptions& o, const TrainModel<R>& model, const AdamW<R>& opt, const RunState& st,
                     const HfCode& code) {
  const fs::path final_dir = fs::path(o.out) / step_dir_name(st.step);
  const fs::path tmp = fs::path(o.out) / ("." + step_dir_name(st.step) + ".tmp-" + std::to_string(getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) fail(tmp.string(), ": cannot create the folder (", ec.message(), ")");
  try {
    const DType save = parse_save_dtype(o.save_dtype);
    const DType exact = sizeof(R) == 8 ? DType::F64 : DType::F32;
    MonetConfig c = model.config();
    c.torch_dtype = save == DType::BF16 ? "bfloat16" : "float32";
    json config = json::parse(config_to_json(c));
    config["auto_map"] = code.auto_map;
    write_file_atomic((tmp / "config.json").string(), config.dump(2) + "\n");
    for (const fs::path& module : code.module_files)
      write_file_atomic((tmp / module.filename()).string(), read_file(module.string()));
    TensorBuffers weights;
    for (const ParamInfo& p : model.layout().params)
      weights.add(p.name, p.shape, model.params.data() + p.offset, p.numel, save);
    add_running_stats(weights, model, DType::F32, "", st.batches_tracked);
    write_safetensors((tmp / "model.safetensors").string(), weights.tensors, {{"format", "pt"}});
    TensorBuffers state;
    const bool need_master = save != exact;
    for (const ParamInfo& p : model.layout().params) {
      state.add("exp_avg." + p.name, p.shape, opt.m.data() + p.offset, p.numel, exact);
      state.add("exp_avg_sq." + p.name, p.shape, opt.v.data() + p.offset, p.numel, exact);
      if (need_master) state.add("master." + p.name, p.shape, model.params.data() + p.offset, p.numel, exact);
    }
    add_running_stats(state, model, DType::F64, "running.", -1);  // the model file rounds them to f32
    write_safetensors((tmp / "optimizer.safetensors").string(), state.tensors,
                      {{"format", "monet-train-1"}, {"step", std::to_string(st.step)},
                       {"rng_state", std::to_string(st.rng)}, {"batches_tracked", std::to_string(st.batches_tracked)}});
    for (const char* name : kTokenizerFiles) {
      const fs::path src = fs::path(o.tokenizer) / name;
      if (fs::exists(src)) write_file_atomic((tmp / name).string(), read_file(src.string()));
    }
    // tokenizer.json beside tokenizer.model, so that AutoTokenizer needs
    // neither sentencepiece nor protobuf
    if (fs::exists(tmp / "tokenizer.model") && !fs::exists(tmp / "tokenizer.json"))
      write_file_atomic((tmp / "tokenizer.json").string(), sentencepiece_to_tokenizer_json((tmp / "tokenizer.model").string()));
    discard_dir(final_dir);
    fs::rename(tmp, final_dir, ec);
    if (ec) fail(final_dir.string(), ": cannot rename the finished checkpoint into place (", ec.message(), ")");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  auto all = list_checkpoints(o.out);
  for (size_t i = 0; o.keep > 0 && i + size_t(o.keep) < all.size(); i++) discard_dir(all[i].second);
}

template <class R>
RunState load_checkpoint(const fs::path& dir, TrainModel<R>& model, AdamW<R>& opt) {
  load_weights(model, dir.string());
  const SafetensorsFile state((dir / "optimizer.safetensors").string());
  const TensorLookup get = [&](const std::string& name) -> const TensorInfo& {
    const TensorInfo* t = state.find(name);
    if (!t) fail(state.path(), ": missing tensor ", name);
    return *t;
  };
  for (const ParamInfo& p : model.layout().params) {
    read_into(get("exp_avg." + p.name), p.shape, opt.m.data() + p.offset);
    read_into(get("exp_avg_sq." + p.name), p.shape, opt.v.data() + p.offset);
    if (state.find("master." + p.name)) read_into(get("master." + p.name), p.shape, model.params.data() + p.offset);
  }
  read_running_stats(model, get, "running.");  // exact: the model file rounds them to f32
  RunState st;
  try {
    st.step = std::stoll(state.metadata().at("step"));
    st.rng = std::stoull(state.metadata().at("rng_state"));
    st.batches_tracked = std::stoll(state.metadata().at("batches_tracked"));
  } catch (const std::exception&) {
    fail(state.path(), ": metadata lacks step / rng_state / batches_tracked (not written by monet train?)");
  }
  return st;
}

// ------------------------------------------------------------ the run

json options_json(const TrainOptions& o) {
  return json{{"data", fs::absolute(o.data).string()}, {"batch", o.batch}, {"seq", o.seq},
              {"grad_accum", o.grad_accum}, {"seed", o.seed}, {"dtype", o.dtype},
              {"val_fraction", o.val_fraction}};
}

// Keeps the rows of train.csv up to `step` (a resumed run rewrites the rest).
void truncate_log(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  std::string line, kept;
  bool header = true;
  while (std::getline(in, line)) {
    if (header) { kept += line + "\n"; header = false; continue; }
    if (line.empty() || in.eof()) break;  // a row cut short by a kill has no newline
    if (std::stoll(line.substr(0, line.find(','))) > step) break;
    kept += line + "\n";
  }
  write_file_atomic(path.string(), kept);
}

// Rank 0's vector on every rank (its size first).
template <class T>
void broadcast_vector(Communicator& comm, std::vector<T>& v) {
  int64_t n = int64_t(v.size());
  comm.broadcast(&n, sizeof n, 0);
  v.resize(size_t(n));
  comm.broadcast(v.data(), v.size() * sizeof(T), 0);
}

// Rank 0's weights, optimizer moments, BatchNorm running stats and run state
// on every rank: all ranks start bit-identical and stay so (they apply the
// same summed gradients).
template <class R>
void broadcast_state(Communicator& comm, TrainModel<R>& model, AdamW<R>& opt, RunState& st) {
  comm.broadcast(model.params.data(), model.params.size() * sizeof(R), 0);
  comm.broadcast(opt.m.data(), opt.m.size() * sizeof(R), 0);
  comm.broadcast(opt.v.data(), opt.v.size() * sizeof(R), 0);
  for (size_t r = 0; r < model.running_mean.size(); r++) {
    comm.broadcast(model.running_mean[r].data(), model.running_mean[r].size() * sizeof(double), 0);
    comm.broadcast(model.running_var[r].data(), model.running_var[r].size() * sizeof(double), 0);
  }
  comm.broadcast(&st, sizeof st, 0);
}

// ZeRO-1: the ranks' shards of the moments, in rank order, as one full
// AdamW on rank 0 (for its checkpoint); the other ranks get an empty one.
template <class R>
AdamW<R> gather_optimizer(Communicator& comm, const AdamW<R>& shard) {
  auto gather = [&](const std::vector<R>& part) {
    std::vector<uint8_t> bytes(part.size() * sizeof(R));
    if (!bytes.empty()) std::memcpy(bytes.data(), part.data(), bytes.size());
    std::vector<R> all;
    for (const std::vector<uint8_t>& b : comm.gather(bytes, 0)) {
      const size_t at = all.size();
      all.resize(at + b.size() / sizeof(R));
      if (!b.empty()) std::memcpy(all.data() + at, b.data(), b.size());
    }
    return all;
  };
  std::vector<R> m = gather(shard.m);
  std::vector<R> v = gather(shard.v);
  return AdamW<R>(0, std::move(m), std::move(v));
}

template <class R>
void train_loop(const TrainOptions& o, const Tokenizer& tok) {
  // Data parallel: rank r of P trains on rows [r*B/P, (r+1)*B/P) of every
  // global batch; rank 0 alone writes (data cache, train.csv, checkpoints).
  std::unique_ptr<Communicator> single = o.comm ? nullptr : make_single_communicator();
  Communicator& comm = o.comm ? *o.comm : *single;
  const int rank = comm.rank(), ranks = comm.size();
  const bool root = rank == 0;
  if (o.batch < ranks)
    fail("--batch ", o.batch, " is smaller than the number of processes (", ranks,
         "): each rank needs at least one sequence of the global batch");
  Corpus corpus;
  if (root) corpus = prepare_data(o, tok);
  if (ranks > 1) {
    broadcast_vector(comm, corpus.train);
    broadcast_vector(comm, corpus.val);
  }
  const int64_t T = o.seq;
  if (int64_t(corpus.train.size()) <= T + 1)
    fail(o.data, ": the training split has ", corpus.train.size(), " tokens, fewer than --seq + 2 = ", T + 2);
  if (o.eval_every > 0 && int64_t(corpus.val.size()) <= T)
    fail(o.data, ": the validation split has ", corpus.val.size(), " tokens, fewer than --seq + 1 = ", T + 1,
         " (raise --val-fraction, lower --seq, or --eval-every 0)");

  // The model: resumed, initialised from a checkpoint, or random.
  const auto checkpoints = list_checkpoints(o.out);
  std::string config_dir;
  if (o.resume) {
    if (checkpoints.empty()) fail_nothing_to_resume(o.out);
    config_dir = checkpoints.back().second.string();
  } else if (!o.init.empty()) {
    config_dir = o.init;
  }
  MonetConfig cfg = config_dir.empty() ? o.shape : load_config((fs::path(config_dir) / "config.json").string());
  const HfCode code = hf_code_of(config_dir);
  if (config_dir.empty()) {
    cfg.vocab_size = tok.vocab_size();
    cfg.bos_token_id = tok.bos_id();
    cfg.eos_token_ids = {tok.eos_id()};
  }
  if (cfg.vocab_size < tok.vocab_size())
    fail("the model's vocab_size ", cfg.vocab_size, " is smaller than the tokenizer's ", tok.vocab_size());
  if (T > cfg.max_position_embeddings)
    fail("--seq ", T, " exceeds the model's max_position_embeddings = ", cfg.max_position_embeddings);
  check_train_model(cfg, o);
  TrainModel<R> model(cfg);
  AdamW<R> opt(model.layout());
  RunState st;
  st.rng = o.seed;
  const fs::path options_path = fs::path(o.out) / "train_options.json";
  const fs::path log_path = fs::path(o.out) / "train.csv";
  if (!root) {
    // the state comes from rank 0 (below)
  } else if (o.resume) {
    const json saved = json::parse(read_file(options_path.string()));
    const json now = options_json(o);
    for (const auto& [k, v] : now.items())
      if (saved.contains(k) && saved[k] != v)
        fail("--resume: option ", k, " was ", saved[k].dump(), " in this run, now ", v.dump(),
             " (an exact resume needs the same data, batch, seq, grad-accum, seed and dtype)");
    st = load_checkpoint(fs::path(config_dir), model, opt);
    truncate_log(log_path, st.step);
    message(o, "resuming from " + config_dir + " (step " + std::to_string(st.step) + ")");
  } else {
    if (!checkpoints.empty())
      fail(o.out, ": already holds checkpoints (", checkpoints.back().second.filename().string(),
           "); use --resume to continue or another --out");
    if (!config_dir.empty()) load_weights(model, config_dir);
    else model.init_random(o.seed, o.init_std);
    write_file_atomic(options_path.string(), options_json(o).dump(2) + "\n");
    write_file_atomic(log_path.string(),
                      "step,tokens,lr,loss,loss_lm,loss_unif,loss_amb,grad_norm,val_loss,tokens_per_s,elapsed_s,"
                      "ranks,comm_bytes,comm_s\n");
  }
  if (ranks > 1) broadcast_state(comm, model, opt, st);
  // ZeRO-1 (--zero1): rank r keeps the AdamW moments of its shard [lo, hi)
  // of the flat parameters only; the gradients are reduce-scattered (each
  // rank gets the summed gradient of its shard), each rank updates its
  // shard, and the shards are all-gathered into every rank's weights.
  const bool zero = o.zero1 && ranks > 1;
  const size_t total = model.layout().total;
  const size_t shard = zero ? (total + size_t(ranks) - 1) / size_t(ranks) : total;
  const size_t lo = zero ? std::min(total, shard * size_t(rank)) : 0;
  const size_t hi = zero ? std::min(total, lo + shard) : total;
  std::vector<R> grad_shard, param_send, param_all;
  if (zero) {
    opt = AdamW<R>(lo, std::vector<R>(opt.m.begin() + ptrdiff_t(lo), opt.m.begin() + ptrdiff_t(hi)),
                   std::vector<R>(opt.v.begin() + ptrdiff_t(lo), opt.v.begin() + ptrdiff_t(hi)));
    model.grads.resize(shard * size_t(ranks), R(0));  // reduce-scatter blocks of `shard`; the padding stays 0
    grad_shard.resize(shard);
    param_send.resize(shard);
    param_all.resize(shard * size_t(ranks));
    message(o, "ZeRO-1: each rank keeps the AdamW moments of " + std::to_string(shard) + " of " +
                   std::to_string(total) + " parameters (" + fixed(2.0 * double(shard) * sizeof(R) / 1e6, 1) +
                   " MB instead of " + fixed(2.0 * double(total) * sizeof(R) / 1e6, 1) + " MB)");
  }
  const auto n_params = model.layout().total;  // the flat buffer holds each parameter once
  message(o, std::string("model: ") + cfg.decompose_name() + ", " + std::to_string(n_params) + " parameters, " +
                 std::to_string(cfg.num_hidden_layers) + " layers, d=" + std::to_string(cfg.hidden_size) + ", E=" +
                 std::to_string(cfg.moe_experts) + " (" + std::to_string(cfg.moe_experts * cfg.moe_experts) +
                 " experts per router), " + o.dtype +
                 (ranks > 1 ? ", " + std::to_string(ranks) + " processes (" + comm.name() + ")" : ""));

  std::FILE* log = nullptr;
  if (root) {
    log = std::fopen(log_path.c_str(), "a");
    if (!log) fail(log_path.string(), ": cannot open for appending (", std::strerror(errno), ")");
  }
  struct CloseLog {
    std::FILE*& f;
    ~CloseLog() { if (f) std::fclose(f); }
  } close_log{log};
  const int64_t B = o.batch, A = o.grad_accum;
  const int64_t row_lo = B * rank / ranks, row_hi = B * (rank + 1) / ranks, B_local = row_hi - row_lo;
  std::vector<int32_t> batch(size_t(B * (T + 1)));
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = st.step;
  for (; st.step < o.steps; ) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = learning_rate(o, st.step);
    std::fill(model.grads.begin(), model.grads.end(), R(0));
    Losses mean;
    StepOptions so;
    so.aux_weight = o.aux_weight;
    so.grad_scale = 1.0 / double(A);
    so.comm = ranks > 1 ? &comm : nullptr;
    comm.reset_stats();
    for (int64_t a = 0; a < A; a++) {
      // Every rank draws the whole global batch's offsets (the sampler's
      // state stays the same everywhere) and keeps its rows.
      for (int64_t b = 0; b < B; b++) {
        const uint64_t off = splitmix64(st.rng) % uint64_t(corpus.train.size() - size_t(T));
        if (b < row_lo || b >= row_hi) continue;
        for (int64_t t = 0; t <= T; t++)
          batch[size_t((b - row_lo) * (T + 1) + t)] = int32_t(corpus.train[off + size_t(t)]);
      }
      const Losses l = model.step(batch.data(), B_local, T, so);
      st.batches_tracked++;
      mean.total += l.total / double(A);
      mean.lm += l.lm / double(A);
      mean.unif += l.unif / double(A);
      mean.amb += l.amb / double(A);
    }
    // Each rank's gradient is its share of the global objective's: their sum is the gradient.
    R* g_update = model.grads.data();  // the summed gradient of [lo, hi)
    double sq = 0;
    if (zero) {
      comm.reduce_scatter_sum(model.grads.data(), grad_shard.data(), shard);
      g_update = grad_shard.data();
#pragma omp parallel for reduction(+ : sq)
      for (size_t i = 0; i < hi - lo; i++) sq += double(grad_shard[i]) * double(grad_shard[i]);
      comm.all_reduce_sum(&sq, 1);
    } else {
      if (ranks > 1) comm.all_reduce_sum(model.grads.data(), model.grads.size());
#pragma omp parallel for reduction(+ : sq)
      for (size_t i = 0; i < model.grads.size(); i++) sq += double(model.grads[i]) * double(model.grads[i]);
    }
    const double grad_norm = std::sqrt(sq);
    if (!std::isfinite(mean.total) || !std::isfinite(grad_norm))
      fail("step ", st.step + 1, ": the loss or gradient is not finite (loss ", mean.total, ", grad norm ", grad_norm,
           "); lower --lr or check the data. The last checkpoint is intact.");
    const R clip = R(std::min(1.0, o.clip / (grad_norm + 1e-6)));
    if (o.clip > 0)
      for (size_t i = 0; i < hi - lo; i++) g_update[i] *= clip;
    opt.update(model.layout(), model.params.data(), g_update, o, lr, st.step + 1);
    if (zero) {
      std::fill(param_send.begin(), param_send.end(), R(0));
      std::copy(model.params.begin() + ptrdiff_t(lo), model.params.begin() + ptrdiff_t(hi), param_send.begin());
      comm.all_gather(param_send.data(), param_all.data(), shard * sizeof(R));
      std::copy(param_all.begin(), param_all.begin() + ptrdiff_t(total), model.params.begin());
    }
    st.step++;

    double val_loss = NAN;
    if (o.eval_every > 0 && (st.step % o.eval_every == 0 || st.step == o.steps)) {
      const int64_t windows = std::max<int64_t>(
          1, std::min<int64_t>((int64_t(corpus.val.size()) - 1) / T, o.val_tokens / T));
      double sum = 0;
      StepOptions eo;
      eo.training = false;
      eo.backward = false;
      // Running statistics: windows are independent; chunks of B go to the ranks in turn.
      for (int64_t w0 = 0; w0 < windows; w0 += B) {
        if ((w0 / B) % ranks != rank) continue;
        const int64_t nb = std::min(B, windows - w0);
        for (int64_t b = 0; b < nb; b++)
          for (int64_t t = 0; t <= T; t++)
            batch[size_t(b * (T + 1) + t)] = int32_t(corpus.val[size_t((w0 + b) * T + t)]);
        sum += model.step(batch.data(), nb, T, eo).lm * double(nb);
      }
      if (ranks > 1) comm.all_reduce_sum(&sum, 1);
      val_loss = sum / double(windows);
    }
    const auto t1 = std::chrono::steady_clock::now();
    const double step_s = std::chrono::duration<double>(t1 - t0).count();
    const double elapsed = std::chrono::duration<double>(t1 - t_start).count();
    const double tok_s = double(B * A * T) / step_s;
    const CommStats comm_step = comm.stats();  // this step's collectives (rank 0's view)
    char val_text[32] = "";
    if (!std::isnan(val_loss)) std::snprintf(val_text, sizeof val_text, "%.10f", val_loss);
    if (root) {
      std::fprintf(log, "%lld,%lld,%.9e,%.10f,%.10f,%.10f,%.10f,%.9e,%s,%.1f,%.2f,%d,%lld,%.6f\n", (long long)st.step,
                   (long long)(st.step * B * A * T), lr, mean.total, mean.lm, mean.unif, mean.amb, grad_norm,
                   val_text, tok_s, elapsed, ranks, (long long)comm_step.bytes, comm_step.seconds);
      if (std::ferror(log) || std::fflush(log) != 0)
        fail(log_path.string(), ": write failed (", std::strerror(errno), ")");
    }
    TrainStepReport report;
    report.step = st.step;
    report.steps = o.steps;
    report.loss = mean.total;
    report.loss_lm = mean.lm;
    report.loss_unif = mean.unif;
    report.loss_amb = mean.amb;
    report.lr = lr;
    report.tokens_per_s = tok_s;
    report.eta_seconds = elapsed / double(st.step - first_step) * double(o.steps - st.step);
    report.val_loss = val_loss;
    report.ranks = ranks;
    report.comm_bytes = comm_step.bytes;
    report.comm_seconds = comm_step.seconds;
    if ((o.save_every > 0 && st.step % o.save_every == 0) || st.step == o.steps) {
      if (zero) {
        const AdamW<R> full = gather_optimizer(comm, opt);  // every rank takes part
        if (root) save_checkpoint(o, model, full, st, code);
      } else if (root) {
        save_checkpoint(o, model, opt, st, code);
      }
      report.saved = (fs::path(o.out) / step_dir_name(st.step)).string();
    }
    if (o.on_step && root) o.on_step(report);
  }
}

}  // namespace

void run_training(const TrainOptions& opts) {
  TrainOptions o = opts;
  validate_train_options(o);
  ScopedThreads threads(o.threads);
  std::error_code ec;
  if (is_root(o)) {
    fs::create_directories(o.out, ec);
    if (ec) fail(o.out, ": cannot create the output folder (", ec.message(), ")");
    remove_stale_temporaries(o.out);
    remove_stale_temporaries(fs::path(o.out) / "data");
  }
  if (o.resume && list_checkpoints(o.out).empty()) fail_nothing_to_resume(o.out);  // before tokenizing the data
  if (o.tokenizer.empty()) {  // --init / --resume: the checkpoint's own tokenizer
    const auto cps = list_checkpoints(o.out);
    o.tokenizer = o.resume && !cps.empty() ? cps.back().second.string() : o.init;
  }
  auto tok = Tokenizer::load_dir(o.tokenizer);
  if (o.dtype == "f64") train_loop<double>(o, *tok);
  else train_loop<float>(o, *tok);
}

void compute_gradients_to_file(const std::string& model_dir, const std::vector<std::vector<int32_t>>& tokens,
                               const std::string& out_path, const std::string& dtype, double aux_weight, int threads) {
  ScopedThreads scoped(threads);
  if (tokens.empty()) fail("no token rows given");
  const size_t len = tokens[0].size();
  for (size_t b = 0; b < tokens.size(); b++)
    if (tokens[b].size() != len) fail("token row ", b + 1, " has ", tokens[b].size(), " ids, row 1 has ", len);
  if (len < 2) fail("each token row needs at least 2 ids (inputs and targets)");
  std::vector<int32_t> flat;
  for (const auto& row : tokens) flat.insert(flat.end(), row.begin(), row.end());
  const MonetConfig cfg = load_config((fs::path(model_dir) / "config.json").string());
  auto run = [&](auto& model) {
    load_weights(model, model_dir);
    StepOptions so;
    so.aux_weight = aux_weight;
    const Losses l = model.step(flat.data(), int64_t(tokens.size()), int64_t(len) - 1, so);
    TensorBuffers tb;
    const double scalars[4] = {l.total, l.lm, l.unif, l.amb};
    const char* names[4] = {"loss", "loss_lm", "loss_unif", "loss_amb"};
    for (int i = 0; i < 4; i++) tb.add(names[i], {1}, &scalars[i], 1, DType::F64);
    for (const ParamInfo& p : model.layout().params)
      tb.add("grad." + p.name, p.shape, model.grads.data() + p.offset, p.numel, DType::F64);
    add_running_stats(tb, model, DType::F64, "running.", -1);
    write_safetensors(out_path, tb.tensors);
  };
  if (dtype == "f64") {
    TrainModel<double> model(cfg);
    run(model);
  } else if (dtype == "f32") {
    TrainModel<float> model(cfg);
    run(model);
  } else {
    fail("--dtype must be f32 or f64, got '", dtype, "'");
  }
}

}  // namespace monet
