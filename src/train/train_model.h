// The trainable Monet: parameters in one flat buffer (HF tensor layout), the
// training-mode forward pass that keeps what the backward pass needs, and the
// backward pass itself. One readable reference path (llm.c style), templated
// on the real type: float for training, double for gradient checks.
// The math is shared/monet-spec.md plus docs/training.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "monet/config.h"

namespace monet { class Communicator; }

namespace monet::train {

// splitmix64: the generator of init and data order (docs/training.md).
inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct ParamInfo {
  std::string name;            // HF tensor name
  std::vector<int64_t> shape;
  size_t offset = 0, numel = 0;
  bool decay = false;          // AdamW weight decay applies (weight matrices only)
};

// Offsets of one layer's parameters into the flat buffer.
struct LayerOffsets {
  size_t ln1, ln2, wq, wk, wv, wo;
  bool has_router = false;
  size_t w1 = 0, w2 = 0;
  // VD: u1,u2 [E*m/2, d] + biases, v11..v22 [d/2, E*m/2], b1,b2 [E, d/2]
  // HD: u [E*m, d] + bias, v [d, E*m], b [E, d]
  size_t u1 = 0, u1b = 0, u2 = 0, u2b = 0, v11 = 0, v12 = 0, v21 = 0, v22 = 0, b1 = 0, b2 = 0;
  size_t u = 0, ub = 0, v = 0, b = 0;
};

// The parameter list of a config, in a fixed order (embedding, layers, norm, lm_head).
struct ParamLayout {
  std::vector<ParamInfo> params;
  std::vector<LayerOffsets> layers;
  size_t embed = 0, final_norm = 0, lm_head = 0;  // lm_head == embed when tied
  size_t total = 0;
  explicit ParamLayout(const MonetConfig& c);
  const ParamInfo* find(const std::string& name) const;
};

struct Losses {
  double total = 0, lm = 0, unif = 0, amb = 0;
};

struct StepOptions {
  bool training = true;     // BatchNorm batch statistics + running-stat update; else running stats
  bool backward = true;     // accumulate gradients (training only)
  double aux_weight = 1e-3; // lambda of L_unif + L_amb
  double grad_scale = 1.0;  // gradients of grad_scale * L (1/grad_accum)
  // Data parallel (training only): this process holds its share of a global
  // batch spread over comm's ranks. BatchNorm statistics, L_unif's mean
  // probabilities, L_amb and the LM loss are sums over every rank's tokens,
  // so the losses are the global batch's and the gradients are this rank's
  // share of the global objective's (their sum over ranks is its gradient).
  Communicator* comm = nullptr;
};

// What the backward pass reads, per layer ([N, ...] rows are tokens b*T+t).
template <class R>
struct LayerActs {
  std::vector<R> x_in, xn1, rstd1;   // [N,d] layer input, input_layernorm output, [N]
  std::vector<R> q, k, v;            // [N,nh*hd], [N,nkv*hd] (after RoPE)
  std::vector<R> probs;              // [B,nh,T,T] attention probabilities
  std::vector<R> att;                // [N,nh*hd] attention output before o_proj
  std::vector<R> h, y, rstd2;        // [N,d] after attention, post_attention_layernorm output, [N]
  std::vector<R> a1, a2;             // [N,E] sum over heads of g1 / g2
  // VD: pre-activations and activations [N,E*m/2]; head mixes p1,p2 [N,H,m/2];
  // the inputs of v11,v12,v21,v22 [N,E*m/2].
  std::vector<R> x1pre, x2pre, x1, x2, p1, p2, c11, c12, c21, c22;
  // HD: pre-activation/activation [N,E*m]; r [N,H,m]; q_mix (input of v) [N,E*m].
  std::vector<R> xpre, xact, r, q_mix;
};

template <class R>
class TrainModel {
 public:
  explicit TrainModel(const MonetConfig& c);

  const MonetConfig& config() const { return c_; }
  const ParamLayout& layout() const { return layout_; }
  std::vector<R> params, grads;   // flat, layout().total each
  // BatchNorm running stats per router: [2 * H] mean (side 1 then 2), same for var.
  std::vector<std::vector<double>> running_mean, running_var;

  // Weights N(0, std), expert biases 0, norms 1, running mean 0 / var 1.
  void init_random(uint64_t seed, double std = 0.02);

  // tokens: B rows of T+1 ids (inputs and shifted targets). Adds gradients
  // into `grads` when training && backward.
  Losses step(const int32_t* tokens, int64_t B, int64_t T, const StepOptions& opts);

 private:
  void forward_layer(int64_t l, std::vector<R>& x, const StepOptions& opts);
  void backward_layer(int64_t l, std::vector<R>& dx);
  void attention_forward(int64_t l);
  void attention_backward(int64_t l, const R* datt, R* dxn1);
  void router_forward(int64_t l, const StepOptions& opts);
  void router_backward(int64_t l, R* dy);
  void experts_forward(int64_t l, R* out);
  void experts_backward(int64_t l, const R* dout, R* dy);
  double aux_losses(const StepOptions& opts, double* unif, double* amb);

  MonetConfig c_;
  ParamLayout layout_;
  int64_t B_ = 0, T_ = 0, N_ = 0;
  int64_t N_all_ = 0;            // tokens of the global batch (N_ on one process)
  Communicator* comm_ = nullptr; // the step's communicator (training only), or null
  std::vector<LayerActs<R>> acts_;
  std::vector<R> rope_cos_, rope_sin_;  // [T, hd/2]
  // Per router: probabilities g1/g2 [N, H, E] and their gradients.
  std::vector<std::vector<R>> g1_, g2_, dg1_, dg2_;
  std::vector<R> xf_, xfn_, rstdf_, probs_;  // final norm input/output, softmax of logits
};

extern template class TrainModel<float>;
extern template class TrainModel<double>;

}  // namespace monet::train
