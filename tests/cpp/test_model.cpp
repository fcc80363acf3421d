// The model on random tiny checkpoints written here (from the tensor table):
// a batch of sequences equals each sequence run alone, and the trainer's
// forward equals the inference forward on the same weights.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>

#include "core/huge_pages.h"
#include "core/monet_math.h"
#include "model/tensor_table.h"
#include "monet/error.h"
#include "monet/memory.h"
#include "monet/model.h"
#include "monet/safetensors.h"
#include "temp_dir.h"
#include "tiny_checkpoint.h"
#include "train/train_model.h"

namespace {

using monet_test::tiny_config;
using monet_test::write_checkpoint;

double max_rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); i++) {
    num = std::max(num, std::abs(double(got[i]) - want[i]));
    den = std::max(den, std::abs(double(want[i])));
  }
  return num / std::max(den, 1e-30);
}

struct SeqRun {
  std::vector<float> logits;
  monet::RouterCapture routing;
};

class BatchedForward : public ::testing::TestWithParam<std::tuple<monet::Decompose, int64_t, monet::DType>> {};

// Sequences of different lengths, some continuing a cache (decode tokens), in
// one call equal each sequence alone: logits and router probabilities.
TEST_P(BatchedForward, EqualsEachSequenceAlone) {
  auto [dec, kv_heads, dtype] = GetParam();
  monet_test::TempDir tmp;
  const monet::MonetConfig c = tiny_config(dec, kv_heads);
  write_checkpoint(tmp.str(), c, dtype, 7);
  monet::LoadOptions lo;
  lo.compute = "f32";  // exact arithmetic: batched and alone take different product paths
  auto model = monet::Model::load(tmp.str(), lo);
  std::mt19937 rng(3);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size - 1));
  // (tokens already in the cache, new tokens): prompts, a long prompt (dense
  // experts), decode steps after a prompt.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{0, 7}, {5, 1}, {0, 1}, {0, 40}, {12, 3}, {9, 1}};
  std::vector<std::vector<int32_t>> history, fresh;
  for (auto [before, n] : shapes) {
    history.emplace_back();
    fresh.emplace_back();
    for (int64_t t = 0; t < before; t++) history.back().push_back(tok(rng));
    for (int64_t t = 0; t < n; t++) fresh.back().push_back(tok(rng));
  }
  // Alone: prefix, then the new tokens.
  std::vector<SeqRun> alone(shapes.size());
  for (size_t s = 0; s < shapes.size(); s++) {
    monet::KvCache cache = model->new_cache();
    std::vector<float> ignored;
    if (!history[s].empty()) model->forward(cache, history[s].data(), int64_t(history[s].size()), ignored);
    monet::ForwardOptions fo;
    fo.capture = &alone[s].routing;
    model->forward(cache, fresh[s].data(), int64_t(fresh[s].size()), alone[s].logits, fo);
  }
  // Batched: the prefixes alone first (as a server's earlier steps), then one call.
  std::vector<monet::KvCache> caches;
  for (size_t s = 0; s < shapes.size(); s++) {
    caches.push_back(model->new_cache());
    std::vector<float> ignored;
    if (!history[s].empty()) model->forward(caches[s], history[s].data(), int64_t(history[s].size()), ignored);
  }
  std::vector<SeqRun> batched(shapes.size());
  std::vector<monet::Sequence> seqs(shapes.size());
  for (size_t s = 0; s < shapes.size(); s++) {
    seqs[s].cache = &caches[s];
    seqs[s].ids = fresh[s].data();
    seqs[s].n = int64_t(fresh[s].size());
    seqs[s].logits = monet::Logits::All;
    seqs[s].logits_out = &batched[s].logits;
    seqs[s].routing = &batched[s].routing;
  }
  model->forward_batch(seqs);
  for (size_t s = 0; s < shapes.size(); s++) {
    EXPECT_EQ(caches[s].length, int64_t(history[s].size() + fresh[s].size()));
    ASSERT_EQ(batched[s].logits.size(), alone[s].logits.size());
    EXPECT_LT(max_rel_err(batched[s].logits, alone[s].logits), 1e-5) << "sequence " << s;
    ASSERT_EQ(batched[s].routing.g1.size(), alone[s].routing.g1.size());
    for (size_t r = 0; r < alone[s].routing.g1.size(); r++) {
      EXPECT_LT(max_rel_err(batched[s].routing.g1[r], alone[s].routing.g1[r]), 1e-5) << "sequence " << s;
      EXPECT_LT(max_rel_err(batched[s].routing.g2[r], alone[s].routing.g2[r]), 1e-5) << "sequence " << s;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Model, BatchedForward,
                         ::testing::Values(std::make_tuple(monet::Decompose::Vertical, 4, monet::DType::F32),
                                           std::make_tuple(monet::Decompose::Horizontal, 2, monet::DType::F32),
                                           std::make_tuple(monet::Decompose::Vertical, 1, monet::DType::BF16),
                                           std::make_tuple(monet::Decompose::Horizontal, 4, monet::DType::F16)));

// Captured intermediates add up: resid_post = resid_pre + attn_out + moe_out.
TEST(Model, ActivationCaptures) {
  monet_test::TempDir tmp;
  const monet::MonetConfig c = tiny_config(monet::Decompose::Vertical, 4);
  write_checkpoint(tmp.str(), c, monet::DType::F32, 11);
  auto model = monet::Model::load(tmp.str());
  const std::vector<int32_t> ids = {1, 5, 9, 2};
  monet::KvCache cache = model->new_cache();
  monet::ActivationCapture cap;
  cap.names = {"resid_pre.1", "attn_out.1", "moe_out.1", "resid_post.1", "resid_pre.2"};
  monet::ForwardOptions fo;
  fo.activations = &cap;
  std::vector<float> logits;
  model->forward(cache, ids.data(), 4, logits, fo);
  ASSERT_EQ(cap.values.size(), 5u);
  const size_t n = size_t(4 * c.hidden_size);
  for (const auto& [name, v] : cap.values) ASSERT_EQ(v.size(), n) << name;
  std::vector<float> sum(n);
  for (size_t i = 0; i < n; i++) sum[i] = cap.values["resid_pre.1"][i] + cap.values["attn_out.1"][i] + cap.values["moe_out.1"][i];
  EXPECT_LT(max_rel_err(sum, cap.values["resid_post.1"]), 1e-6);
  EXPECT_EQ(cap.values["resid_post.1"], cap.values["resid_pre.2"]);
  monet::ActivationCapture bad;
  bad.names = {"resid_pre.3"};
  fo.activations = &bad;
  EXPECT_THROW(model->forward(cache, ids.data(), 1, logits, fo), monet::Error);
}

// LoadOptions::huge_pages gives the logits of the plain load, bit for bit:
// weights read in place stay in place (the mapped file, whose page cache
// the option may read again into 2 MiB pages), weights the load converts
// (the transposed v matrices, 2 MiB each with these 4096 experts) are
// copied into huge pages; the store's pages released after the load come
// back from the file.
TEST(Model, HugePagesGiveTheLogitsOfThePlainLoad) {
  monet_test::TempDir tmp;
  monet::MonetConfig c = tiny_config(monet::Decompose::Vertical, 2);
  c.vocab_size = 8192 + 37;
  c.moe_experts = 4096;
  write_checkpoint(tmp.str(), c, monet::DType::F32, 12);
  const std::vector<int32_t> ids = {1, 5, 8000, 2, 77};
  const size_t file_bytes = size_t(std::filesystem::file_size(tmp.path() / "model.safetensors"));
  std::vector<float> logits[2];
  for (int huge = 0; huge < 2; huge++) {
    monet::LoadOptions lo;
    lo.huge_pages = huge == 1;
    auto model = monet::Model::load(tmp.str(), lo);
    const monet::Weight& head = model->weights().lm_head;
    const monet::Weight& v = model->weights().layers[0].experts.v11;
    EXPECT_FALSE(head.owned) << "a float matrix is read in place";
    ASSERT_TRUE(v.owned && v.bytes() >= (size_t(2) << 20)) << "the transposed v11 is a copy of 2 MiB or more: " << v.bytes();
    if (huge && monet::huge_pages_available() && monet::available_memory_bytes() > (uint64_t(3) << 30))
      EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data) % (uintptr_t(2) << 20), 0u)
          << "a converted weight of over 2 MiB was not copied into huge pages";
    EXPECT_LE(model->file_huge_page_bytes(), file_bytes);
    EXPECT_EQ(model->file_huge_page_bytes() % (size_t(2) << 20), 0u);
    monet::KvCache cache = model->new_cache();
    monet::ForwardOptions fo;
    fo.all_logits = true;
    model->forward(cache, ids.data(), int64_t(ids.size()), logits[huge], fo);
  }
  ASSERT_EQ(logits[0].size(), size_t(5 * (8192 + 37)));
  EXPECT_EQ(logits[0], logits[1]);
}

// The trainer's forward (eval mode: BatchNorm running statistics) and the
// inference forward compute the same model: equal mean next-token loss on
// the same weights, f64 trainer vs f32 inference.
TEST(Model, TrainerForwardEqualsInference) {
  for (monet::Decompose dec : {monet::Decompose::Vertical, monet::Decompose::Horizontal}) {
    monet_test::TempDir tmp;
    const monet::MonetConfig c = tiny_config(dec, 2);
    write_checkpoint(tmp.str(), c, monet::DType::F32, 5);
    auto model = monet::Model::load(tmp.str());
    std::mt19937 rng(9);
    std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size - 1));
    const int64_t T = 24;
    std::vector<int32_t> ids(static_cast<size_t>(T + 1));
    for (int32_t& id : ids) id = tok(rng);

    std::vector<float> logits;
    monet::KvCache cache = model->new_cache();
    model->forward(cache, ids.data(), T, logits);
    double nll = 0;
    for (int64_t t = 0; t < T; t++) nll += monet::nll_from_logits(logits.data() + t * c.vocab_size, c.vocab_size, ids[size_t(t + 1)]);
    nll /= double(T);

    monet::train::TrainModel<double> trainer(c);
    auto store = monet::TensorStore::open_dir(tmp.str());
    for (const monet::train::ParamInfo& p : trainer.layout().params) {
      const monet::TensorInfo& t = store->get(p.name);
      for (size_t i = 0; i < p.numel; i++) trainer.params[p.offset + i] = t.element(i);
    }
    for (int64_t r = 0; r < c.num_router_layers(); r++)
      for (int side = 0; side < 2; side++)
        for (int64_t h = 0; h < c.moe_heads; h++) {
          const int64_t l = r * c.moe_groups;
          trainer.running_mean[size_t(r)][size_t(side * c.moe_heads + h)] =
              store->get(monet::router_norm_name(l, side + 1, "running_mean")).element(size_t(h));
          trainer.running_var[size_t(r)][size_t(side * c.moe_heads + h)] =
              store->get(monet::router_norm_name(l, side + 1, "running_var")).element(size_t(h));
        }
    monet::train::StepOptions eval;
    eval.training = false;
    eval.backward = false;
    const double train_nll = trainer.step(ids.data(), 1, T, eval).lm;
    EXPECT_NEAR(train_nll, nll, 1e-5 * nll) << (dec == monet::Decompose::Vertical ? "VD" : "HD");
  }
}

}  // namespace
