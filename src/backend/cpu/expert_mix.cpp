// The Monet expert mix (docs/monet.md "Experts") on the CPU, for T tokens.
//
// Only experts a token's routers kept (g > 0 for some head) contribute. For
// each token and side the kept experts are its "entries": expert index,
// a = sum_h g[h, i] and the head column g[:, i]. The factorised mix turns each
// entry's activation x (relu2 of its u slice) into coefficients for the v
// slices (docs/monet.md):
//   VD: in11[a] = a1 x1[a], in12[a] = sum_h g1[h,a] p2[h], bias1[a] = a1   (left half)
//       in21[b] = sum_h g2[h,b] p1[h], in22[b] = a2 x2[b], bias2[b] = a2   (right half)
//       with p1[h] = sum_a g1[h,a] x1[a], p2[h] = sum_b g2[h,b] x2[b]
//   HD: in21[b] = sum_h g2[h,b] p[h], bias2[b] = a2, p[h] = sum_a g1[h,a] x[a]
// A mask weight M[i,j] != 1 adds (M - 1) times the pair's term
// pw E_ij(y), pw = sum_h g1[h,i] g2[h,j], to those coefficients: no extra
// weights are read.
//
// Two ways to read the weights:
//   dense  - GEMMs over all experts (x for every expert, coefficients
//            scattered into [T, E*w] matrices with zeros elsewhere);
//   sparse - entries grouped by expert: each selected u/v slice is read once
//            and applied to every token that selected it.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "backend/cpu/amx.h"
#include "backend/cpu/cpu_backend.h"

namespace monet::cpu {

// The entries of T tokens on one side, token-major: token t owns entries
// [start[t], start[t+1]).
struct SideEntries {
  std::vector<int64_t> start;  // [T+1]
  std::vector<int32_t> expert; // [n] expert index i
  std::vector<float> total;    // [n] a = sum_h g[h, i]
  std::vector<float> head;     // [n, H] g[h, i]
  std::vector<int32_t> token;  // [n] the owning token
  // The same entries grouped by expert: by_expert[by_start[i] .. by_start[i+1]).
  std::vector<int64_t> by_start;  // [E+1]
  std::vector<int64_t> by_expert; // [n] entry ids, tokens ascending within an expert
  std::vector<int32_t> used;      // the experts with at least one entry, ascending
};

namespace {

// Above this fraction of kept (token, expert slice) pairs the dense GEMMs
// are faster than the sparse path (expert_mix).
constexpr double kSparseMaxDensity = 0.2;
// Slices selected by at least this many tokens take the AMX tiles: packing a
// slice for the tiles costs about what a few tokens' products do (prefill
// 128/512 tokens at the 1.4B shape: 4, 6 and 8 within 5 % of each other;
// 1: 5 % slower, and decode 17 % slower), and batches of fewer than
// kSmallBatch tokens (decode) then never pack (their v slices never do).
constexpr int64_t kTileMinTokens = kSmallBatch;
// Parts of a few tokens' v slices summed apart (expert_mix_sparse): enough
// for a thread each up to 8 threads, the same for any number of them.
constexpr int64_t kSliceParts = 8;
static_assert(amx::kTileRows >= kSmallBatch, "a tile's ids hold a row pass's");

// Per-entry coefficients of the v slices (see the file comment), [n, w] / [n].
struct Coefficients {
  std::vector<float> in11, in12, in21, in22, bias1, bias2;
};

// The vectors of one expert_mix call, the calling thread's, kept from call to
// call with their capacity: vectors of megabytes allocated afresh every call
// were mapped and zeroed by the kernel every time (72k page faults per
// 512-token prefill at the 1.4B shape). Taken by reference in the calling
// thread (a thread_local named inside a parallel loop is each thread's own).
struct MixWorkspace {
  SideEntries r1, r2;
  // What r1 and r2 were made from (ExpertMixArgs::same_routing)
  const float* g1 = nullptr;
  const float* g2 = nullptr;
  int64_t T = -1, H = -1, E = -1;
  std::vector<uint8_t> kept;
  std::vector<int64_t> count, fill;
  Coefficients co;
  std::vector<float> x1, x2, y_rounded, parts;
  std::vector<uint16_t> y16;
};

MixWorkspace& mix_workspace() {
  static thread_local MixWorkspace ws;
  return ws;
}

void side_entries(const float* g, int64_t T, int64_t H, int64_t E, int threads, SideEntries& s, MixWorkspace& ws) {
  s.start.assign(size_t(T + 1), 0);
  // kept[t, i]: token t keeps expert i (any head's g > 0): one vectorised
  // pass over g, then the entries are read at the kept experts only.
  std::vector<uint8_t>& kept = ws.kept;
  std::vector<int64_t>& count = ws.count;
  std::vector<int64_t>& fill = ws.fill;
  kept.resize(size_t(T * E));
  count.resize(size_t(T));
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1)
  for (int64_t t = 0; t < T; t++) {
    const float* gt = g + t * H * E;
    uint8_t* k = kept.data() + t * E;
    std::fill(k, k + E, uint8_t(0));
    for (int64_t h = 0; h < H; h++)
      for (int64_t i = 0; i < E; i++) k[i] |= uint8_t(gt[h * E + i] > 0.0f);
    int64_t n = 0;
    for (int64_t i = 0; i < E; i++) n += k[i];
    count[size_t(t)] = n;
  }
  for (int64_t t = 0; t < T; t++) s.start[size_t(t + 1)] = s.start[size_t(t)] + count[size_t(t)];
  const int64_t n = s.start[size_t(T)];
  s.expert.resize(size_t(n));
  s.total.resize(size_t(n));
  s.head.resize(size_t(n * H));
  s.token.resize(size_t(n));
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1)
  for (int64_t t = 0; t < T; t++) {
    const float* gt = g + t * H * E;
    const uint8_t* k = kept.data() + t * E;
    int64_t e = s.start[size_t(t)];
    for (int64_t i = 0; i < E; i++) {
      if (!k[i]) continue;
      float a = 0.0f;
      for (int64_t h = 0; h < H; h++) {
        a += gt[h * E + i];
        s.head[size_t(e * H + h)] = gt[h * E + i];
      }
      s.expert[size_t(e)] = int32_t(i);
      s.total[size_t(e)] = a;
      s.token[size_t(e)] = int32_t(t);
      e++;
    }
  }
  // Counting sort by expert (stable: tokens stay ascending).
  s.by_start.assign(size_t(E + 1), 0);
  for (int64_t e = 0; e < n; e++) s.by_start[size_t(s.expert[size_t(e)] + 1)]++;
  s.used.clear();
  for (int64_t i = 0; i < E; i++) {
    if (s.by_start[size_t(i + 1)] > 0) s.used.push_back(int32_t(i));
    s.by_start[size_t(i + 1)] += s.by_start[size_t(i)];
  }
  s.by_expert.resize(size_t(n));
  fill.assign(s.by_start.begin(), s.by_start.end() - 1);
  for (int64_t e = 0; e < n; e++) s.by_expert[size_t(fill[size_t(s.expert[size_t(e)])]++)] = e;
}

struct MixShape {
  bool vd;
  int64_t H, E, w, d;
};

// The coefficients of token t from its entries' activations x1 [n1, w] (and
// x2 [n2, w] for VD), written at the token's entries. scratch: [2, H, w].
void token_coefficients(const MixShape& s, const SideEntries& r1, const SideEntries& r2, const float* x1,
                        const float* x2, const ExpertMask* mask, int64_t group, int64_t t, Coefficients& c,
                        float* scratch) {
  const int64_t H = s.H, w = s.w;
  const int64_t a0 = r1.start[size_t(t)], a1 = r1.start[size_t(t + 1)];
  const int64_t b0 = r2.start[size_t(t)], b1 = r2.start[size_t(t + 1)];
  float* p1 = scratch;          // [H, w] sum_a g1[h,a] x1[a]
  float* p2 = scratch + H * w;  // [H, w] sum_b g2[h,b] x2[b]
  auto head_mix = [&](const SideEntries& r, int64_t e0, int64_t e1, const float* x, float* p) {
    std::fill(p, p + H * w, 0.0f);
    for (int64_t e = e0; e < e1; e++)
      for (int64_t h = 0; h < H; h++) {
        const float gh = r.head[size_t(e * H + h)];
        if (gh == 0.0f) continue;
        for (int64_t k = 0; k < w; k++) p[h * w + k] += gh * x[e * w + k];
      }
  };
  auto head_spread = [&](const SideEntries& r, int64_t e0, int64_t e1, const float* p, std::vector<float>& in) {
    for (int64_t e = e0; e < e1; e++) {
      float* q = in.data() + e * w;
      std::fill(q, q + w, 0.0f);
      for (int64_t h = 0; h < H; h++) {
        const float gh = r.head[size_t(e * H + h)];
        if (gh == 0.0f) continue;
        for (int64_t k = 0; k < w; k++) q[k] += gh * p[h * w + k];
      }
    }
  };
  head_mix(r1, a0, a1, x1, p1);
  head_spread(r2, b0, b1, p1, c.in21);
  for (int64_t b = b0; b < b1; b++) c.bias2[size_t(b)] = r2.total[size_t(b)];
  if (s.vd) {
    head_mix(r2, b0, b1, x2, p2);
    head_spread(r1, a0, a1, p2, c.in12);
    for (int64_t a = a0; a < a1; a++) {
      c.bias1[size_t(a)] = r1.total[size_t(a)];
      for (int64_t k = 0; k < w; k++) c.in11[size_t(a * w + k)] = r1.total[size_t(a)] * x1[a * w + k];
    }
    for (int64_t b = b0; b < b1; b++)
      for (int64_t k = 0; k < w; k++) c.in22[size_t(b * w + k)] = r2.total[size_t(b)] * x2[b * w + k];
  }
  if (!mask || mask->group_empty(group)) return;
  for (int64_t a = a0; a < a1; a++)
    for (int64_t b = b0; b < b1; b++) {
      const float m = mask->weight(group, r1.expert[size_t(a)], r2.expert[size_t(b)]);
      if (m == 1.0f) continue;
      float pw = 0.0f;
      for (int64_t h = 0; h < H; h++) pw += r1.head[size_t(a * H + h)] * r2.head[size_t(b * H + h)];
      const float f = (m - 1.0f) * pw;  // the pair's term is added this many times more
      if (f == 0.0f) continue;
      for (int64_t k = 0; k < w; k++) {
        c.in21[size_t(b * w + k)] += f * x1[a * w + k];
        if (s.vd) {
          c.in11[size_t(a * w + k)] += f * x1[a * w + k];
          c.in12[size_t(a * w + k)] += f * x2[b * w + k];
          c.in22[size_t(b * w + k)] += f * x2[b * w + k];
        }
      }
      if (s.vd) c.bias1[size_t(a)] += f;
      c.bias2[size_t(b)] += f;
    }
}

// Zeroed coefficients (token_coefficients sums into them), in the workspace.
Coefficients& allocate_coefficients(const MixShape& s, int64_t n1, int64_t n2, MixWorkspace& ws) {
  Coefficients& c = ws.co;
  c.in21.assign(size_t(n2 * s.w), 0.0f);
  c.bias2.assign(size_t(n2), 0.0f);
  if (s.vd) {
    c.in11.assign(size_t(n1 * s.w), 0.0f);
    c.in12.assign(size_t(n1 * s.w), 0.0f);
    c.in22.assign(size_t(n2 * s.w), 0.0f);
    c.bias1.assign(size_t(n1), 0.0f);
  }
  return c;
}

const ExpertMask* token_mask(const ExpertMixArgs& a, int64_t t) { return a.masks ? a.masks[t] : nullptr; }

// The AMX tiles take an expert's products when its slices are bf16 rows
// whose products take bf16 inputs (the dense path's arithmetic); the callers
// check the shapes (amx.h).
bool tiles_take(const Weight& w, bool rounds_inputs) {
  return w.dtype == DType::BF16 && rounds_inputs && amx::usable();
}

}  // namespace

void CpuBackend::expert_mix(const ExpertMixArgs& a) {
  // The kept entries of both sides, made once for the choice and the path.
  const int64_t T = a.T, H = a.config->moe_heads, E = a.config->moe_experts;
  MixWorkspace& ws = mix_workspace();
  SideEntries& r1 = ws.r1;
  SideEntries& r2 = ws.r2;
  // The layers of a router group after its first read the same g1, g2:
  // their entries are made once (1.4B prefill of 512 tokens: side_entries
  // took 94 ms of 2.0 s, 48 calls).
  const bool same = a.same_routing && ws.g1 == a.g1 && ws.g2 == a.g2 && ws.T == T && ws.H == H && ws.E == E;
  if (!same) {
    ws.g1 = nullptr;  // (r1, r2 half made if side_entries throws)
    side_entries(a.g1, T, H, E, threads_, r1, ws);
    side_entries(a.g2, T, H, E, threads_, r2, ws);
    ws.g1 = a.g1;
    ws.g2 = a.g2;
    ws.T = T;
    ws.H = H;
    ws.E = E;
  }
  ExpertPath path = a.path;
  if (path == ExpertPath::Auto) {
    // Sparse work grows with the kept (token, expert) pairs, dense work with
    // all of them; a kept pair costs the sparse path about 4x what a pair
    // costs the dense GEMMs (AMD, no AMX: Monet-VD-1.4B prefill, bf16,
    // sparse 1.3x faster at 12 % kept, the default model dense 1.3x faster at
    // 30 %; Intel with the sparse products on AMX tiles: 1.26x and 1.1x).
    path = ExpertPath::Sparse;
    if (T > kSmallBatch) {
      const double density = double(r1.start[size_t(T)] + r2.start[size_t(T)]) / double(2 * T * E);
      if (density > kSparseMaxDensity) path = ExpertPath::Dense;
    }
  }
  if (path == ExpertPath::Dense) expert_mix_dense(a, r1, r2);
  else expert_mix_sparse(a, r1, r2);
}

void CpuBackend::expert_mix_sparse(const ExpertMixArgs& a, const SideEntries& r1, const SideEntries& r2) {
  const MonetConfig& c = *a.config;
  const ExpertWeights& ew = *a.weights;
  const MixShape s{c.moe_decompose == Decompose::Vertical, c.moe_heads, c.moe_experts,
                   c.moe_decompose == Decompose::Vertical ? c.moe_dim / 2 : c.moe_dim, c.hidden_size};
  const int64_t T = a.T, H = s.H, E = s.E, w = s.w, d = s.d;
  const int64_t n1 = r1.start[size_t(T)], n2 = r2.start[size_t(T)];

  // x[e, :] = relu2(u[expert*w .. +w] . y[token] + bias): one pass over each
  // selected u slice for up to kSmallBatch of its tokens at a time.
  MixWorkspace& ws = mix_workspace();
  std::vector<float>& y_rounded = ws.y_rounded;  // the tokens' inputs as the GEMM's bf16 products take them
  std::vector<uint16_t>& y16 = ws.y16;           // the same in bf16, for the tiles: rows ld16 apart (not a power of two:
  bool have_y_rounded = false, have_y16 = false; // (made once per call for both sides)
  const BlockQ8Act* yq_all = nullptr;            // (the same for the int8 blocks and layout)
  const Q8Token* token_all = nullptr;
  const int64_t ld16 = d + 32;   // the same columns of many rows would share a few cache sets)
  auto relu2_out = [&](const float* out, const float* bv, int64_t i, const int64_t* ids, int64_t nt,
                       std::vector<float>& x) {
    for (int64_t k = 0; k < nt; k++)
      for (int64_t row = 0; row < w; row++) {
        const float v = std::max(out[k * w + row] + bv[i * w + row], 0.0f);
        x[size_t(ids[k] * w + row)] = v * v;
      }
  };
  auto activations = [&](const Weight& u, const Weight& bias, const SideEntries& r, std::vector<float>& x) {
    x.resize(size_t(r.token.size()) * size_t(w));
    const float* bv = static_cast<const float*>(bias.data);
    // On AMX: a slice with enough tokens is packed once into the tile
    // layout, then its tokens' rows are gathered 16 at a time.
    const bool tiles = d % 32 == 0 && w <= 16 && tiles_take(u, rounds_inputs(u));
    if (tiles && !have_y16) {  // once for both sides (VD)
      have_y16 = true;
      y16.resize(size_t(T * ld16));
#pragma omp parallel for schedule(static) num_threads(threads_)
      for (int64_t t = 0; t < T; t++)
        k_.pack_bf16_pairs(a.y + t * d, reinterpret_cast<uint32_t*>(y16.data() + t * ld16), d);
    }
    const float* y = a.y;
    if (rounds_inputs(u)) {
      if (!have_y_rounded) {  // once for both sides (VD)
        have_y_rounded = true;
        y_rounded.resize(size_t(T * d));
        round_to_bf16(a.y, T * d, y_rounded.data());
      }
      y = y_rounded.data();
    }
    // Q8_0 u: every token's y quantized once, then int8 products (linear's
    // small batches alike); one token (decode) also laid out once for all
    // its slices (once per call for both sides, VD).
    if (u.dtype == DType::Q8_0 && !yq_all) {
      yq_all = quantize_activations(a.y, T, d, 1);
      token_all = T == 1 ? prepare_token(yq_all, d / kQ8Block, 1) : nullptr;
    }
    const BlockQ8Act* yq = u.dtype == DType::Q8_0 ? yq_all : nullptr;
    const Q8Token* token = u.dtype == DType::Q8_0 ? token_all : nullptr;
    // Q8_0 slices with enough tokens (prefill) take the int8 tiles.
    const bool q8_tiles = yq && T > kSmallBatch && w <= 16 && amx::usable();
    // One token on the int8 layout: the slices in one run per thread (the
    // same work each), so that each slice but a thread's first was
    // prefetched by the one before.
    const int64_t n_used = int64_t(r.used.size());
    const int64_t chunk = token ? std::max<int64_t>(1, (n_used + threads_ - 1) / threads_) : 4;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads_)
    for (int64_t j = 0; j < n_used; j++) {
      const int64_t i = r.used[size_t(j)];
      const int64_t p0 = r.by_start[size_t(i)], p1 = r.by_start[size_t(i + 1)];
      int64_t ids[amx::kTileRows];
      if (q8_tiles && p1 - p0 >= kTileMinTokens) {
        // Q8_0 on the int8 tiles: the slice packed once, its tokens' int8
        // blocks gathered 16 at a time.
        const int64_t nb = d / kQ8Block;
        uint8_t* packed = reinterpret_cast<uint8_t*>(thread_scratch(5, size_t(amx::q8_slice_bytes(nb) + 3) / 4));
        float* out = thread_scratch(6, size_t(amx::kTileRows * w));
        float* scratch = thread_scratch(7, size_t(amx::q8_tile_scratch_floats(nb)));
        amx::pack_q8_slice(u.row(i * w), u.row_bytes(), w, nb, packed);
        const BlockQ8Act* xs[amx::kTileRows];
        for (int64_t p = p0; p < p1; p += amx::kTileRows) {
          const int64_t nt = std::min<int64_t>(amx::kTileRows, p1 - p);
          for (int64_t k = 0; k < nt; k++) {
            ids[k] = r.by_expert[size_t(p + k)];
            xs[k] = yq + int64_t(r.token[size_t(ids[k])]) * nb;
          }
          amx::q8_dot_slice_tile(xs, nt, packed, w, nb, out, scratch);
          relu2_out(out, bv, i, ids, nt, x);
        }
        continue;
      }
      if (tiles && p1 - p0 >= kTileMinTokens) {
        uint32_t* packed = reinterpret_cast<uint32_t*>(thread_scratch(5, size_t(d / 2 * w)));
        float* out = thread_scratch(6, size_t(amx::kTileRows * w));
        amx::pack_u(reinterpret_cast<const uint16_t*>(u.row(i * w)), u.row_bytes(), w, d, packed);
        const uint16_t* rows[amx::kTileRows];
        for (int64_t p = p0; p < p1; p += amx::kTileRows) {
          const int64_t nt = std::min<int64_t>(amx::kTileRows, p1 - p);
          for (int64_t k = 0; k < nt; k++) {
            ids[k] = r.by_expert[size_t(p + k)];
            rows[k] = y16.data() + int64_t(r.token[size_t(ids[k])]) * ld16;
          }
          amx::dot_tile(rows, nt, packed, w, d, out);
          relu2_out(out, bv, i, ids, nt, x);
        }
        continue;
      }
      // Up to kSmallBatch tokens per pass over the slice.
      const float* rows[kSmallBatch];
      float* out = thread_scratch(6, size_t(kSmallBatch * w));  // out[token k * w + row]
      const RowKernels* rk = k_.rows(u.dtype);
      for (int64_t p = p0; p < p1; p += kSmallBatch) {
        const int64_t nt = std::min<int64_t>(kSmallBatch, p1 - p);
        for (int64_t k = 0; k < nt; k++) {
          ids[k] = r.by_expert[size_t(p + k)];
          rows[k] = y + int64_t(r.token[size_t(ids[k])]) * d;
        }
        if (token) {
          // (the next slice prefetched at the same offsets: the thread's next one but at its run's end)
          const void* next = j + 1 < n_used ? u.row(int64_t(r.used[size_t(j + 1)]) * w) : nullptr;
          k_.q8_0.dot_rows_token(u.row(i * w), u.row_bytes(), w, *token, out, next);
        } else if (yq) {
          const BlockQ8Act* qrows[kSmallBatch];
          for (int64_t k = 0; k < nt; k++) qrows[k] = yq + int64_t(r.token[size_t(ids[k])]) * (d / kQ8Block);
          k_.q8_0.dot_rows(u.row(i * w), u.row_bytes(), w, qrows, nt, d, out, w);
        } else if (rk) {
          // The expert's w rows together: several rows stream at once.
          rk->dot_rows(u.row(i * w), u.row_bytes(), w, rows, nt, d, out, w);
        } else {
          float* wrow = thread_scratch(5, size_t(d));
          for (int64_t row = 0; row < w; row++) {
            u.rows_to_f32(i * w + row, 1, wrow);
            k_.f32.dot_multi(wrow, rows, nt, d, out + row, w);
          }
        }
        relu2_out(out, bv, i, ids, nt, x);
      }
    }
  };
  std::vector<float>& x1 = ws.x1;  // every element written (each entry is one slice's)
  std::vector<float>& x2 = ws.x2;
  activations(s.vd ? ew.u1 : ew.u, s.vd ? ew.u1_bias : ew.u_bias, r1, x1);
  if (s.vd) activations(ew.u2, ew.u2_bias, r2, x2);

  Coefficients& co = allocate_coefficients(s, n1, n2, ws);
#pragma omp parallel for schedule(static) num_threads(threads_) if (T > 1)
  for (int64_t t = 0; t < T; t++)
    token_coefficients(s, r1, r2, x1.data(), x2.data(), token_mask(a, t), a.group, t, co,
                       thread_scratch(4, size_t(2 * H * w)));

  // out[token, :] = v slices . coefficients, expert by expert: a few tokens'
  // slices split among the threads (whole rows), more tokens' columns (each
  // thread owns a column range, so every slice row is read once per range).
  struct Term {
    const Weight* v;
    std::vector<float>* coef;
  };
  auto project = [&](const SideEntries& r, const Term* terms, int n_terms, const Weight& b,
                     std::vector<float>& bias_coef, int64_t col0, int64_t N) {
    // The coefficients as the dense path's bf16 products take them.
    for (int k = 0; k < n_terms; k++)
      if (rounds_inputs(*terms[k].v))
        round_to_bf16(terms[k].coef->data(), int64_t(terms[k].coef->size()), terms[k].coef->data());
    if (rounds_inputs(b)) round_to_bf16(bias_coef.data(), int64_t(bias_coef.size()), bias_coef.data());
    // All terms' rows of an entry in one pass over its columns when the
    // v slices share a row kernel (the same sums as row after row).
    const RowKernels* rk = k_.rows(terms[0].v->dtype);
    for (int k = 1; k < n_terms; k++)
      if (terms[k].v->dtype != terms[0].v->dtype) rk = nullptr;
    if (n_terms * w > kMaxAxpyRows) rk = nullptr;
    // out[c0:c1] += slice i's rows . entry e's coefficients, and its bias row
    // (out indexed from column 0, as the Q8_0 rows' axpy indexes them)
    bool q8 = n_terms * w <= kMaxAxpyRows;
    for (int k = 0; k < n_terms; k++) q8 = q8 && terms[k].v->dtype == DType::Q8_0;
    // next: the expert after i in the thread's order (-1: none; at the end
    // of a thread's parts, another thread's first), whose rows the Q8_0
    // rows' pass prefetches
    auto add_slice = [&](int64_t i, int64_t e, float* out, int64_t c0, int64_t c1, int64_t next) {
      if (q8) {
        const void* rows[kMaxAxpyRows];
        const void* ahead[kMaxAxpyRows];
        float coefs[kMaxAxpyRows];
        // the next expert's rows that its first token reads (all of them with T > 1)
        const int64_t next_e = next >= 0 && T == 1 ? r.by_expert[size_t(r.by_start[size_t(next)])] : -1;
        for (int k = 0; k < n_terms; k++)
          for (int64_t j = 0; j < w; j++) {
            rows[k * w + j] = terms[k].v->row(i * w + j);
            const bool read = next >= 0 && (next_e < 0 || (*terms[k].coef)[size_t(next_e * w + j)] != 0.0f);
            ahead[k * w + j] = read ? terms[k].v->row(next * w + j) : nullptr;
            coefs[k * w + j] = (*terms[k].coef)[size_t(e * w + j)];
          }
        k_.q8_0.axpy_multi(rows, coefs, n_terms * w, out, c0, c1, next >= 0 ? ahead : nullptr);
      } else if (rk) {
        const void* rows[kMaxAxpyRows];
        float coefs[kMaxAxpyRows];
        const size_t esize = dtype_size(terms[0].v->dtype);
        for (int k = 0; k < n_terms; k++)
          for (int64_t j = 0; j < w; j++) {
            rows[k * w + j] = terms[k].v->row(i * w + j) + size_t(c0) * esize;
            coefs[k * w + j] = (*terms[k].coef)[size_t(e * w + j)];
          }
        rk->axpy_multi(rows, coefs, n_terms * w, out + c0, c1 - c0);
      } else {
        for (int k = 0; k < n_terms; k++) axpy_rows(*terms[k].v, i * w, w, terms[k].coef->data() + e * w, out, c0, c1);
      }
      axpy_rows(b, i, 1, &bias_coef[size_t(e)], out, c0, c1);
    };
    // A few tokens (decode): the selected slices are split into kSliceParts
    // parts of about equal tokens, each summed over whole rows into its own
    // out[T, N], then the parts are added in order (the same sums for any
    // number of threads; a token's grouping of its terms, and so their
    // rounding, depends on the batch's other tokens, as in the u products
    // of several tokens; parts by fixed ranges of experts, the same for any
    // batch, were 2-4 % slower in decode). Whole rows are long runs (an
    // expert's w rows are adjacent), where the column ranges below read each
    // thread's piece of every row: short runs the hardware prefetcher starts
    // late on (1.4B decode, medians of alternating builds: bf16 +0.5-3 %,
    // q8_0 +4 %).
    if (T <= kSmallBatch) {
      const int64_t total = r.by_start[size_t(E)], n_used = int64_t(r.used.size());
      int64_t part_start[kSliceParts + 1];  // into r.used
      for (int64_t q = 0, j = 0; q <= kSliceParts; q++) {
        while (j < n_used && r.by_start[size_t(r.used[size_t(j)])] * kSliceParts < q * total) j++;
        part_start[q] = q == kSliceParts ? n_used : j;
      }
      std::vector<float>& parts = ws.parts;  // [part, token, N]
      parts.assign(size_t(kSliceParts * T * N), 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads_)
      for (int64_t q = 0; q < kSliceParts; q++)
        for (int64_t j = part_start[q]; j < part_start[q + 1]; j++) {
          const int64_t i = r.used[size_t(j)], next = j + 1 < n_used ? r.used[size_t(j + 1)] : -1;
          for (int64_t p = r.by_start[size_t(i)]; p < r.by_start[size_t(i + 1)]; p++) {
            const int64_t e = r.by_expert[size_t(p)];
            add_slice(i, e, parts.data() + (q * T + int64_t(r.token[size_t(e)])) * N, 0, N, next);
          }
        }
      for (int64_t t = 0; t < T; t++) {
        float* o = a.out + t * d + col0;
        std::copy(parts.begin() + t * N, parts.begin() + (t + 1) * N, o);
        for (int64_t q = 1; q < kSliceParts; q++) k_.axpy(1.0f, parts.data() + (q * T + t) * N, o, N);
      }
      return;
    }
#pragma omp parallel num_threads(threads_)
    {
      const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t chunk = ((N + nt - 1) / nt + 15) / 16 * 16;  // whole vectors per thread
      const int64_t c0 = std::min(N, tid * chunk), c1 = std::min(N, c0 + chunk);
      // The sums go to acc[T, ld] (columns [c0, c1) of each row), then to out:
      // out's rows are a power of two apart, so the same columns of many
      // tokens share a few cache sets and evict each other; acc's are not.
      // (Rows hold columns from 0, as the Q8_0 rows' axpy indexes them.)
      const int64_t ld = c1 + 16;
      float* acc = c0 < c1 ? thread_scratch(6, size_t(T * ld)) : nullptr;
      for (int64_t t = 0; t < T && c0 < c1; t++) std::fill(acc + t * ld + c0, acc + t * ld + c1, 0.0f);
      // On AMX: a slice with enough tokens has its rows (all terms' and the
      // bias row) packed in pairs over this thread's columns, and its tokens'
      // coefficients go 16 at a time.
      const int64_t n_rows = n_terms * w + 1, pair_rows = (n_rows + 1) / 2, lda = 2 * pair_rows;
      bool tiles = pair_rows <= amx::kMaxPairRows && (c1 - c0) % 16 == 0 && tiles_take(b, rounds_inputs(b));
      for (int k = 0; k < n_terms; k++) tiles = tiles && tiles_take(*terms[k].v, rounds_inputs(*terms[k].v));
      uint32_t* packed = tiles ? reinterpret_cast<uint32_t*>(thread_scratch(5, size_t(pair_rows * (c1 - c0)))) : nullptr;
      float* products = tiles ? thread_scratch(7, size_t(amx::kAxpyScratchFloats)) : nullptr;
      uint16_t a_tile[amx::kTileRows * 2 * amx::kMaxPairRows] = {};
      const uint16_t* rows16[2 * amx::kMaxPairRows];
      float* outs[amx::kTileRows];
      // The next slice's rows, prefetched while a slice's products run: on
      // the tiles all terms' rows and the bias row from column c0 (as
      // pack_pairs reads them), for Q8_0 the terms' blocks over [c0, c1).
      // (1.4B prefill of 128 tokens: bf16 +3-5 %, q8_0 +2-4 %, medians of
      // alternating runs.)
      static_assert(2 * amx::kMaxPairRows + 1 <= kMaxAxpyRows, "RowPrefetch holds a tile slice's rows");
      RowPrefetch ahead;
      const int64_t n_used = int64_t(r.used.size());
      auto prefetch_slice = [&](int64_t j_used) {
        ahead.next = 0;
        ahead.n_rows = 0;
        if (j_used >= n_used) return;
        const int64_t i = r.used[size_t(j_used)];
        const size_t from = q8 ? size_t(c0 / kQ8Block) * sizeof(BlockQ8_0) : size_t(c0) * 2;
        const size_t to = q8 ? size_t((c1 + kQ8Block - 1) / kQ8Block) * sizeof(BlockQ8_0) : size_t(c1) * 2;
        for (int k = 0; k < n_terms; k++)
          for (int64_t j = 0; j < w; j++) ahead.rows[ahead.n_rows++] = terms[k].v->row(i * w + j) + from;
        if (!q8) ahead.rows[ahead.n_rows++] = b.row(i) + from;
        ahead.row_lines = int64_t((to - from + 63) / 64) + 1;  // (+1: rows need not start on a line)
      };
      for (int64_t j_used = 0; j_used < n_used && c0 < c1; j_used++) {
        const int64_t i = r.used[size_t(j_used)];
        const int64_t p0 = r.by_start[size_t(i)], p1 = r.by_start[size_t(i + 1)];
        if (tiles && p1 - p0 >= kTileMinTokens) {
          for (int k = 0; k < n_terms; k++)
            for (int64_t j = 0; j < w; j++)
              rows16[k * w + j] = reinterpret_cast<const uint16_t*>(terms[k].v->row(i * w + j)) + c0;
          rows16[n_terms * w] = reinterpret_cast<const uint16_t*>(b.row(i)) + c0;
          amx::pack_pairs(rows16, n_rows, c1 - c0, packed);
          prefetch_slice(j_used + 1);
          for (int64_t p = p0; p < p1; p += amx::kTileRows) {
            const int64_t nt = std::min<int64_t>(amx::kTileRows, p1 - p);
            for (int64_t k = 0; k < nt; k++) {
              const int64_t e = r.by_expert[size_t(p + k)];
              uint16_t* arow = a_tile + k * lda;  // the coefficients were rounded to bf16 above: exact
              for (int m = 0; m < n_terms; m++)
                for (int64_t j = 0; j < w; j++) arow[m * w + j] = f32_to_bf16((*terms[m].coef)[size_t(e * w + j)]);
              arow[n_terms * w] = f32_to_bf16(bias_coef[size_t(e)]);
              outs[k] = acc + int64_t(r.token[size_t(e)]) * ld + c0;
            }
            amx::axpy_tile(a_tile, lda, pair_rows, packed, c1 - c0, outs, nt, products, &ahead);
          }
          continue;
        }
        if (q8) {
          // Q8_0 slices: up to kSmallBatch tokens at a time, each row's
          // blocks widened once for all of them (add_slice's sums per token).
          const int64_t n_rows_q8 = n_terms * w;
          const void* rows[kMaxAxpyRows];
          for (int k = 0; k < n_terms; k++)
            for (int64_t j = 0; j < w; j++) rows[k * w + j] = terms[k].v->row(i * w + j);
          float coefs[kSmallBatch * kMaxAxpyRows];
          float* outs_q8[kSmallBatch];
          prefetch_slice(j_used + 1);
          ahead.issue(ahead.n_rows * ahead.row_lines);
          for (int64_t p = p0; p < p1; p += kSmallBatch) {
            const int64_t nt = std::min<int64_t>(kSmallBatch, p1 - p);
            for (int64_t k = 0; k < nt; k++) {
              const int64_t e = r.by_expert[size_t(p + k)];
              for (int m = 0; m < n_terms; m++)
                for (int64_t j = 0; j < w; j++) coefs[k * n_rows_q8 + m * w + j] = (*terms[m].coef)[size_t(e * w + j)];
              outs_q8[k] = acc + int64_t(r.token[size_t(e)]) * ld;
            }
            k_.q8_0.axpy_multi_tokens(rows, coefs, n_rows_q8, outs_q8, nt, c0, c1);
            for (int64_t k = 0; k < nt; k++)
              axpy_rows(b, i, 1, &bias_coef[size_t(r.by_expert[size_t(p + k)])], outs_q8[k], c0, c1);
          }
          continue;
        }
        for (int64_t p = p0; p < p1; p++) {
          const int64_t e = r.by_expert[size_t(p)];
          add_slice(i, e, acc + int64_t(r.token[size_t(e)]) * ld, c0, c1, -1);
        }
      }
      for (int64_t t = 0; t < T && c0 < c1; t++)
        std::memcpy(a.out + t * d + col0 + c0, acc + t * ld + c0, size_t(c1 - c0) * sizeof(float));
    }
  };
  if (s.vd) {
    const Term left[2] = {{&ew.v11, &co.in11}, {&ew.v12, &co.in12}};
    const Term right[2] = {{&ew.v21, &co.in21}, {&ew.v22, &co.in22}};
    project(r1, left, 2, ew.b1, co.bias1, 0, d / 2);
    project(r2, right, 2, ew.b2, co.bias2, d / 2, d / 2);
  } else {
    const Term term[1] = {{&ew.v, &co.in21}};
    project(r2, term, 1, ew.b, co.bias2, 0, d);
  }
}

void CpuBackend::expert_mix_dense(const ExpertMixArgs& a, const SideEntries& r1, const SideEntries& r2) {
  const MonetConfig& c = *a.config;
  const ExpertWeights& ew = *a.weights;
  const MixShape s{c.moe_decompose == Decompose::Vertical, c.moe_heads, c.moe_experts,
                   c.moe_decompose == Decompose::Vertical ? c.moe_dim / 2 : c.moe_dim, c.hidden_size};
  const int64_t T = a.T, H = s.H, E = s.E, w = s.w, d = s.d, Ew = E * w;
  // x for every expert: [T, E*w] (buffers from the backend's cache: no page faults per call)
  const size_t dense_bytes = size_t(T * Ew) * sizeof(float);
  Buffer x1 = alloc(dense_bytes), x2;
  linear(s.vd ? ew.u1 : ew.u, a.y, T, x1.f32(), s.vd ? &ew.u1_bias : &ew.u_bias);
  activation(Activation::Relu2, x1.f32(), T * Ew);
  if (s.vd) {
    x2 = alloc(dense_bytes);
    linear(ew.u2, a.y, T, x2.f32(), &ew.u2_bias);
    activation(Activation::Relu2, x2.f32(), T * Ew);
  }
  const int64_t n1 = r1.start[size_t(T)], n2 = r2.start[size_t(T)];
  // The kept experts' activations, entry-major as the coefficients want them.
  auto gather = [&](const Buffer& x, const SideEntries& r, std::vector<float>& xs) {
    xs.resize(r.token.size() * size_t(w));
    for (size_t e = 0; e < r.token.size(); e++)
      std::memcpy(xs.data() + e * size_t(w), x.f32() + int64_t(r.token[e]) * Ew + int64_t(r.expert[e]) * w,
                  size_t(w) * 4);
  };
  MixWorkspace& ws = mix_workspace();
  std::vector<float>& xs1 = ws.x1;
  std::vector<float>& xs2 = ws.x2;
  gather(x1, r1, xs1);
  if (s.vd) gather(x2, r2, xs2);
  Coefficients& co = allocate_coefficients(s, n1, n2, ws);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t t = 0; t < T; t++)
    token_coefficients(s, r1, r2, xs1.data(), xs2.data(), token_mask(a, t), a.group, t, co,
                       thread_scratch(4, size_t(2 * H * w)));
  // Coefficients scattered into [T, E*w] (and bias coefficients [T, E]).
  auto scatter = [&](const SideEntries& r, const std::vector<float>& in, float* dense) {
    std::memset(dense, 0, dense_bytes);
    for (size_t e = 0; e < r.token.size(); e++)
      std::memcpy(dense + int64_t(r.token[e]) * Ew + int64_t(r.expert[e]) * w, in.data() + e * size_t(w), size_t(w) * 4);
  };
  Buffer bias_dense = alloc(size_t(T * E) * sizeof(float));
  auto scatter_bias = [&](const SideEntries& r, const std::vector<float>& in) {
    std::memset(bias_dense.data(), 0, size_t(T * E) * sizeof(float));
    for (size_t e = 0; e < r.token.size(); e++) bias_dense.f32()[int64_t(r.token[e]) * E + r.expert[e]] = in[e];
    return bias_dense.f32();
  };
  if (!s.vd) {
    scatter(r2, co.in21, x1.f32());
    matmul_nn(x1.f32(), T, ew.v, a.out, false);
    matmul_nn(scatter_bias(r2, co.bias2), T, ew.b, a.out, true);
    return;
  }
  const int64_t d2 = d / 2;
  Buffer half = alloc(size_t(T * d2) * sizeof(float));
  float* dense = x1.f32();  // x1 and x2 were gathered: their memory holds the coefficients now
  auto half_out = [&](const SideEntries& r, const std::vector<float>& in_a, const Weight& va,
                      const std::vector<float>& in_b, const Weight& vb, const std::vector<float>& bias, const Weight& b,
                      int64_t col0) {
    scatter(r, in_a, dense);
    matmul_nn(dense, T, va, half.f32(), false);
    scatter(r, in_b, x2.f32());
    matmul_nn(x2.f32(), T, vb, half.f32(), true);
    matmul_nn(scatter_bias(r, bias), T, b, half.f32(), true);
    for (int64_t t = 0; t < T; t++) std::memcpy(a.out + t * d + col0, half.f32() + t * d2, size_t(d2) * 4);
  };
  half_out(r1, co.in11, ew.v11, co.in12, ew.v12, co.bias1, ew.b1, 0);
  half_out(r2, co.in21, ew.v21, co.in22, ew.v22, co.bias2, ew.b2, d2);
}

}  // namespace monet::cpu
