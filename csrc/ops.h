// The CPU implementations behind the `entropix` torch library namespace
// (schemas in registration.cpp; semantics in entropix_vllm/ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

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

// -> token ids i64 [B].
at::Tensor sample_candidates_cpu(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                 const at::Tensor& temperature, const at::Tensor& top_k,
                                 const at::Tensor& top_p, const at::Tensor& min_p,
                                 const at::Tensor& n_draws, const at::Tensor& noise);
at::Tensor sample_candidates_meta(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                  const at::Tensor& temperature, const at::Tensor& top_k,
                                  const at::Tensor& top_p, const at::Tensor& min_p,
                                  const at::Tensor& n_draws, const at::Tensor& noise);

// -> (attn_entropy, attn_varentropy, agreement, interaction_strength) f32 [B] each.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_cpu(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_meta(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale);

}  // namespace entropix
