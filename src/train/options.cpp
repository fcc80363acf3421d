// Validation of `monet train` options: every number in its range before any
// work, the model shape by the same rules as config.json (so a trained
// checkpoint always loads), and the memory a run needs against the machine.
#include <cmath>
#include <string>

#include "core/checked.h"
#include "monet/error.h"
#include "monet/memory.h"
#include "monet/train.h"

namespace monet {

namespace {

// config.json fields as the options that set them.
const std::map<std::string, std::string> kShapeOptions = {
    {"vocab_size", "vocab_size (the tokenizer's)"}, {"hidden_size", "--hidden"}, {"num_hidden_layers", "--layers"},
    {"num_attention_heads", "--heads"}, {"num_key_value_heads", "--kv-heads"}, {"max_position_embeddings", "--max-pos"},
    {"moe_experts", "--experts"}, {"moe_heads", "--moe-heads"}, {"moe_dim", "--moe-dim"}, {"moe_topk", "--topk"},
    {"moe_groups", "--groups"}};

void check_int(const char* option, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) fail(option, " ", value, " is outside [", lo, ", ", hi, "]");
}

void check_real(const char* option, double value, double lo, double hi, bool hi_open = false) {
  if (!std::isfinite(value) || value < lo || value > hi || (hi_open && value == hi))
    fail(option, " ", value, " is outside [", lo, ", ", hi, hi_open ? ")" : "]");
}

}  // namespace

TrainMemory estimate_train_memory(const MonetConfig& c, int64_t batch, int64_t seq, size_t real_bytes) {
  const int64_t d = c.hidden_size, nh = c.num_attention_heads, nkv = c.num_key_value_heads, hd = c.head_dim();
  const int64_t H = c.moe_heads, E = c.moe_experts, m = c.moe_dim, V = c.vocab_size, L = c.num_hidden_layers;
  const uint64_t N = sat_product({batch, seq});
  // Parameters, gradients and AdamW's two moments.
  TrainMemory mem;
  mem.state = sat_product({4, int64_t(std::min<uint64_t>(config_parameter_count(c), uint64_t(INT64_MAX))),
                           int64_t(real_bytes)});
  // What each layer keeps for the backward pass (the larger arrays only):
  // x, norms, h, y, q, attention output [N, d]; k, v [N, nkv*hd]; attention
  // probabilities [B, nh, T, T]; head sums [N, 2E]; expert activations
  // (VD: ten [N, E*m/2]; HD: three [N, E*m]).
  const int64_t expert_arrays = c.moe_decompose == Decompose::Vertical ? 5 : 3;
  uint64_t per_layer = sat_mul(N, uint64_t(6 * d + 2 * nkv * hd + 2 * E));
  per_layer = sat_add(per_layer, sat_product({batch, nh, seq, seq}));
  per_layer = sat_add(per_layer, sat_mul(N, sat_product({expert_arrays, E, m})));
  uint64_t acts = sat_mul(per_layer, uint64_t(L));
  // Router probabilities and their gradients [N, H, E] x 4 per router; the
  // final norm and the softmax of the logits [N, V].
  acts = sat_add(acts, sat_mul(N, sat_product({c.num_router_layers(), 4, H, E})));
  acts = sat_add(acts, sat_mul(N, uint64_t(2 * d + V)));
  mem.activations = sat_mul(acts, real_bytes);
  return mem;
}

void validate_train_options(const TrainOptions& o) {
  if (o.out.empty()) fail("--out is required");
  if (o.tokenizer.empty() && o.init.empty() && !o.resume)
    fail("--tokenizer is required (a directory with tokenizer.model or tokenizer.json)");
  constexpr int64_t kMaxCount = int64_t(1) << 40;  // steps, tokens: far beyond any CPU run, far below overflow
  check_int("--steps", o.steps, 1, kMaxCount);
  check_int("--batch", o.batch, 1, int64_t(1) << 20);
  check_int("--seq", o.seq, 2, ConfigLimits::positions);
  check_int("--grad-accum", o.grad_accum, 1, int64_t(1) << 20);
  // tokens per step and in the whole run (train.csv's "tokens" column)
  const uint64_t step_tokens = sat_product({o.batch, o.grad_accum, o.seq});
  if (step_tokens > uint64_t(kMaxCount) || sat_mul(step_tokens, uint64_t(o.steps)) > uint64_t(INT64_MAX / 2))
    fail("--batch ", o.batch, " x --grad-accum ", o.grad_accum, " x --seq ", o.seq, " x --steps ", o.steps,
         " tokens is too many (at most ", kMaxCount, " per step and 2^62 in all)");
  check_int("--eval-every", o.eval_every, 0, kMaxCount);
  check_int("--val-tokens", o.val_tokens, 0, kMaxCount);
  check_int("--save-every", o.save_every, 0, kMaxCount);
  check_int("--keep", o.keep, 0, kMaxCount);
  check_int("--log-every", o.log_every, 1, kMaxCount);
  check_int("--threads", o.threads, 0, 1024);
  if (!(o.lr > 0)) fail("--lr must be > 0, found ", o.lr);
  check_real("--lr", o.lr, 0, 1e3);
  check_real("--warmup", o.warmup, 0, double(kMaxCount));
  check_real("--min-lr-ratio", o.min_lr_ratio, 0, 1);
  check_real("--weight-decay", o.weight_decay, 0, 1e3);
  check_real("--clip", o.clip, 0, 1e30);
  check_real("--aux-weight", o.aux_weight, 0, 1e6);
  check_real("--init-std", o.init_std, 0, 1e3);
  check_real("--val-fraction", o.val_fraction, 0, 1, /*hi_open=*/true);
  check_real("beta1", o.beta1, 0, 1, true);
  check_real("beta2", o.beta2, 0, 1, true);
  if (!(o.adam_eps > 0)) fail("adam_eps must be > 0, found ", o.adam_eps);
  check_real("adam_eps", o.adam_eps, 0, 1);
  if (o.dtype != "f32" && o.dtype != "f64") fail("--dtype must be f32 or f64, got '", o.dtype, "'");
  if (o.save_dtype != "F32" && o.save_dtype != "f32" && o.save_dtype != "float32" && o.save_dtype != "BF16" &&
      o.save_dtype != "bf16" && o.save_dtype != "bfloat16")
    fail("--save-dtype must be f32 or bf16, got '", o.save_dtype, "'");
  // The shape of a new model (--init and --resume take the checkpoint's):
  // vocab_size comes from the tokenizer later, so it is checked in
  // check_train_model; here any valid value stands in.
  if (o.init.empty() && !o.resume) {
    MonetConfig shape = o.shape;
    shape.vocab_size = 1;
    validate_config(shape, "", kShapeOptions);
    if (o.seq > shape.max_position_embeddings)
      fail("--seq ", o.seq, " exceeds --max-pos ", shape.max_position_embeddings);
  }
}

void check_train_model(const MonetConfig& c, const TrainOptions& o, uint64_t available) {
  validate_config(c, "", kShapeOptions);
  const size_t real_bytes = o.dtype == "f64" ? 8 : 4;
  const TrainMemory mem = estimate_train_memory(c, o.batch, o.seq, real_bytes);
  if (available == 0) available = available_memory_bytes();
  if (available == 0 || sat_add(mem.state, mem.activations) <= available) return;  // unknown: allocations decide
  fail("training this model with --batch ", o.batch, " and --seq ", o.seq, " needs at least ",
       format_bytes(sat_add(mem.state, mem.activations)), " of memory (", format_bytes(mem.state),
       " for the parameters, gradients and AdamW moments, ", format_bytes(mem.activations),
       " for the activations), but only ", format_bytes(available), " is available");
}

}  // namespace monet
