// The CPU implementations behind the `entropix` torch library namespace
// (schemas in registration.cpp; semantics in entropix_vllm/ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace entropix {

// Largest num_candidates logit_stats accepts (the project uses K_MAX = 128).
constexpr int64_t kMaxCandidates = 1024;

// logits [B, V] float32/bfloat16/float16 ->
// (max f32 [B], argmax i64 [B], logsumexp f32 [B], entropy f32 [B] (bits),
//  varentropy f32 [B] (bits^2), cand_vals f32 [B, K] descending, cand_ids i64 [B, K]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logit_stats_cpu(const at::Tensor& logits, int64_t num_candidates);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logit_stats_meta(const at::Tensor& logits, int64_t num_candidates);

// Per-thread scratch of sample_candidates_row for K candidates.
struct CandidateScratch {
  explicit CandidateScratch(int64_t K) : s(K), filt(K), order(K) {}
  std::vector<double> s, filt;
  std::vector<int64_t> order;
};

// One row of sample_candidates (SPEC section 4 on K candidates; see
// sample_candidates.cpp): v/ids the row's K candidates, zb its N x K noise.
int64_t sample_candidates_row(const float* v, const int64_t* ids, int64_t K, float temperature,
                              int64_t top_k, float top_p, float min_p, int64_t n_draws,
                              const float* zb, int64_t N, CandidateScratch& scratch);

// -> token ids i64 [B].
at::Tensor sample_candidates_cpu(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                 const at::Tensor& temperature, const at::Tensor& top_k,
                                 const at::Tensor& top_p, const at::Tensor& min_p,
                                 const at::Tensor& n_draws, const at::Tensor& noise);
at::Tensor sample_candidates_meta(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                  const at::Tensor& temperature, const at::Tensor& top_k,
                                  const at::Tensor& top_p, const at::Tensor& min_p,
                                  const at::Tensor& n_draws, const at::Tensor& noise);

// The Entropix decision and draw of every row (ops.decide_and_sample):
// -> (tokens i64, branch i64, temperature f32, top_k i64, top_p f32, min_p f32,
//     n_draws i64), each [B].
using DecideOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
DecideOutputs decide_and_sample_cpu(const at::Tensor& entropy, const at::Tensor& varentropy,
                      const c10::optional<at::Tensor>& attn_entropy,
                      const c10::optional<at::Tensor>& attn_varentropy,
                      const c10::optional<at::Tensor>& agreement,
                      const c10::optional<at::Tensor>& interaction_strength,
                      const at::Tensor& coeff_table, at::IntArrayRef columns,
                      const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                      const at::Tensor& noise, const at::Tensor& argmax,
                      const at::Tensor& cot_token, const at::Tensor& prev_is_cot,
                      const at::Tensor& logits, int64_t k_max);
DecideOutputs decide_and_sample_meta(const at::Tensor& entropy, const at::Tensor& varentropy,
                       const c10::optional<at::Tensor>& attn_entropy,
                       const c10::optional<at::Tensor>& attn_varentropy,
                       const c10::optional<at::Tensor>& agreement,
                       const c10::optional<at::Tensor>& interaction_strength,
                       const at::Tensor& coeff_table, at::IntArrayRef columns,
                       const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                       const at::Tensor& noise, const at::Tensor& argmax,
                       const at::Tensor& cot_token, const at::Tensor& prev_is_cot,
                       const at::Tensor& logits, int64_t k_max);

// -> (attn_entropy, attn_varentropy, agreement, interaction_strength) f32 [B] each.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_cpu(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_meta(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale);

}  // namespace entropix
