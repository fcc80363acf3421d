// The CPU backend's innermost loops, compiled once per instruction-set level
// (kernels_*.cpp include kernels_impl.inc with their own -m flags) and picked
// at run time from what the CPU supports, so one portable binary runs the
// AVX-512 loops where they exist and plain ones elsewhere.
#pragma once
#include <algorithm>  // (kernels_impl.inc is included inside a namespace: its std headers come from here)
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "monet/dtype.h"

namespace monet::cpu {

// Activation batches up to this many rows take the streaming paths (each
// weight row read once from memory and applied to every row from
// registers/L1); larger batches go to GEMMs. The one small-batch cut-off.
constexpr int64_t kSmallBatch = 8;
// The most rows one axpy_multi call takes (callers split longer lists).
constexpr int64_t kMaxAxpyRows = 64;

// Rows a loop prefetches into L2 a few lines at a time between its steps, so
// that they arrive while it computes: the next expert slice's rows in the
// sparse mix, short runs (a thread's columns of each row) that the hardware
// prefetcher starts late on. issue() is built for every CPU (kernels.cpp).
struct RowPrefetch {
  const void* rows[kMaxAxpyRows];     // where each row's lines start
  int64_t n_rows = 0, row_lines = 0;  // rows, 64-byte lines per row
  int64_t next = 0;                   // lines issued so far, row after row
  // Prefetch the next `lines` lines (fewer where fewer are left).
  void issue(int64_t lines);
};

// Loops over one weight row in a given dtype. `row` points at the row's
// first element (F32, F16, BF16; never Q8_0, whose rows are widened first).
struct RowKernels {
  // y[t * ystride] = row . x[t][0..K) for t < T <= kSmallBatch
  void (*dot_multi)(const void* row, const float* const* x, int64_t T, int64_t K, float* y, int64_t ystride);
  // y[t * ystride + r] = row r . x[t] for nrows consecutive rows `row_bytes` apart
  void (*dot_rows)(const void* rows, size_t row_bytes, int64_t nrows, const float* const* x, int64_t T, int64_t K,
                   float* y, int64_t ystride);
  // out[c] += coef * row[c] for c < n
  void (*axpy)(const void* row, float coef, float* out, int64_t n);
  // out[c] += sum_r coef[r] * rows[r][c] for c < n, r < nrows <= kMaxAxpyRows:
  // the same sums as axpy row after row, out read and written once
  void (*axpy_multi)(const void* const* rows, const float* coef, int64_t nrows, float* out, int64_t n);
  // out[c] = float(row[c]) for c < n
  void (*to_f32)(const void* row, float* out, int64_t n);
};

// Activations multiplied with Q8_0 weights (docs/quantization.md): blocks of
// kQ8Block int8 values with a float32 scale, d = max|x| / 127 and
// q = x * (1 / d) rounded to nearest even (every level rounds alike, so the
// blocks are identical whatever the level).
struct BlockQ8Act {
  float d;
  int8_t q[kQ8Block];
};

// One token's activation blocks laid out for the one-token loop over Q8_0
// rows (levels with VNNI): made once, then applied to every row of every
// slice a decode step reads. Two blocks per step, up to kQ8TokenSteps steps.
constexpr int64_t kQ8TokenSteps = 64;
struct Q8Token {
  alignas(64) int8_t q[kQ8TokenSteps * 64];            // the two blocks' quants of each step
  alignas(64) int32_t minus_128x[kQ8TokenSteps * 16];  // -128 times each 4 quants' sum
  alignas(64) float d[kQ8TokenSteps * 16];             // the two blocks' scales, lanes 0-7 and 8-15
  const BlockQ8Act* x = nullptr;                       // the blocks (an odd count's last one is read here)
  int64_t nb = 0;
};

// Loops over Q8_0 weight rows: integer dot products of 32-value blocks,
// scaled by the weight block's and the activation block's scales.
struct Q8Kernels {
  // x[0..K) as K / kQ8Block activation blocks (K a multiple of kQ8Block)
  void (*quantize)(const float* x, BlockQ8Act* out, int64_t K);
  // y[t * ystride + r] = sum_b dw[r,b] dx[t,b] (qw[r,b] . qx[t,b]) for r < nrows Q8_0
  // rows `row_bytes` apart, t < T <= kSmallBatch
  void (*dot_rows)(const void* rows, size_t row_bytes, int64_t nrows, const BlockQ8Act* const* x, int64_t T,
                   int64_t K, float* y, int64_t ystride);
  // out[c] += coef * d[c / 32] * q[c] for c in [c0, c1) of one Q8_0 row
  void (*axpy)(const void* row, float coef, float* out, int64_t c0, int64_t c1);
  // out[c] += coef[r] * (row r's values) over [c0, c1) for r < nrows <= kMaxAxpyRows, in
  // order: axpy's sums row after row, bit for bit, at every level. next:
  // null, or nrows rows (null entries skipped) the caller reads next,
  // prefetched at the same offsets (AVX-512 levels).
  void (*axpy_multi)(const void* const* rows, const float* coef, int64_t nrows, float* out, int64_t c0, int64_t c1,
                     const void* const* next);
  // axpy_multi for nt tokens with the same rows (no prefetch; kSmallBatch at a time):
  // outs[t][c] += coef[t * nrows + r] * (row r's values) over [c0, c1), each
  // token's sums those of axpy_multi, in the same order (except that a zero
  // coefficient adds a zero, which may turn a -0.0 into +0.0); each row's
  // blocks are widened once for all the tokens.
  void (*axpy_multi_tokens)(const void* const* rows, const float* coef, int64_t nrows, float* const* outs, int64_t nt,
                            int64_t c0, int64_t c1);
  // x's nb blocks as a Q8Token; false (out untouched) where nb / 2 >
  // kQ8TokenSteps. Null, as dot_rows_token, where the level has no
  // one-token loop (the levels without VNNI).
  bool (*prepare_token)(const BlockQ8Act* x, int64_t nb, Q8Token* out);
  // y[r] = row r . token for r < nrows: dot_rows' sums for T = 1, exactly.
  // next: null, or the nrows rows (row_bytes apart) the caller reads next,
  // prefetched at the same offsets.
  void (*dot_rows_token)(const void* rows, size_t row_bytes, int64_t nrows, const Q8Token& x, float* y,
                         const void* next);
};

struct KernelSet {
  const char* name;           // "avx512bf16", "avx512", "avx2", "generic"
  RowKernels f32, f16, bf16;
  Q8Kernels q8_0;
  // n floats rounded to bf16 (nearest even), two per 32-bit word: out[i/2]
  void (*pack_bf16_pairs)(const float* x, uint32_t* out, int64_t n);
  float (*dot)(const float* a, const float* b, int64_t n);           // sum a[i] b[i]
  void (*axpy)(float a, const float* x, float* y, int64_t n);         // y += a x
  void (*scale)(float a, float* x, int64_t n);                       // x *= a
  float (*exp_shifted_sum)(float* x, int64_t n, float shift);         // x = exp(x - shift), x <= shift; sum x

  // The row kernels of a weight dtype, or null when rows must be widened
  // through dtype_traits first (block-quantized types).
  const RowKernels* rows(DType t) const {
    return t == DType::F32 ? &f32 : t == DType::BF16 ? &bf16 : t == DType::F16 ? &f16 : nullptr;
  }
};

// Kernel sets compiled into this binary, best first, with whether this CPU runs them.
struct KernelChoice {
  const KernelSet* set;
  bool supported;
};
std::vector<KernelChoice> kernel_sets();
// "" or "auto": the best supported set; else the named one (monet::Error
// when unknown or not supported by this CPU).
const KernelSet& select_kernels(const std::string& name);

}  // namespace monet::cpu
