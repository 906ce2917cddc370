// entropix::paged_attention_stats for CPU tensors: SPEC section 2 from a paged
// key cache (ops.paged_attention_stats is the contract, reference.
// attention_stats + reference.gather_paged the float64 oracle).
//
// One task per request (parallel over the batch). A task computes the scores
// s[h, k] = scale * <q_h, k_k> of all H query heads against the request's L
// keys into a per-thread float32 buffer [H, L] (each key, read through the
// block table with the cache's own strides, is loaded once and dotted with the
// H / H_kv query heads that share it), then per head: max, the moments S0, S1
// of d = s - max in float64 (entropy e_h = (log S0 - S1 / S0) / ln 2 bits), the
// sum of |s| and the probabilities in place; then the mean probability over
// heads per key and the summed |P - mean|. Dot products accumulate in float32
// (vector lanes), every sum over keys or heads in float64.
//
// Outputs per request (float32 [B] each): mean_h e_h, population variance of
// e_h over heads, mean_{h,k} |P_hk - mean_h P_hk|, mean_{h,k} |s_hk|; zeros
// when L == 0, NaN when a score is NaN or infinite.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "ops.h"

namespace entropix {
namespace {
constexpr double kLn2 = 0.69314718055994530942;

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_cpu(
    const at::Tensor& q_in, const at::Tensor& key_cache, const at::Tensor& block_table_in,
    const at::Tensor& seq_lens_in, double scale) {
  const char* op = "entropix::paged_attention_stats: ";
  for (const at::Tensor* t : {&q_in, &key_cache, &block_table_in, &seq_lens_in}) {
    TORCH_CHECK(t->device().is_cpu(), op, "expected CPU tensors, got ", t->device());
  }
  TORCH_CHECK(q_in.dim() == 3, op, "q must be [B, H, D], got ", q_in.sizes());
  TORCH_CHECK(key_cache.dim() == 4, op, "key_cache must be [num_blocks, block_size, H_kv, D], got ",
              key_cache.sizes());
  TORCH_CHECK(is_float_type(q_in.scalar_type()) && is_float_type(key_cache.scalar_type()), op,
              "q and key_cache must be float32, bfloat16 or float16, got ", q_in.scalar_type(),
              " and ", key_cache.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), Hkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, op, "head size mismatch: q has ", D, ", key_cache has ",
              key_cache.size(3));
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, op, "query heads (", H,
              ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(block_table_in.dim() == 2 && block_table_in.size(0) == B, op,
              "block_table must be [B, max_blocks] with B = ", B, ", got ", block_table_in.sizes());
  TORCH_CHECK(seq_lens_in.dim() == 1 && seq_lens_in.size(0) == B, op, "seq_lens must be [", B,
              "], got ", seq_lens_in.sizes());
  TORCH_CHECK(!at::isFloatingType(block_table_in.scalar_type()) &&
                  !at::isFloatingType(seq_lens_in.scalar_type()),
              op, "block_table and seq_lens must be integer tensors");

  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor bt = block_table_in.to(at::kLong).contiguous();
  const at::Tensor sl = seq_lens_in.to(at::kLong).contiguous();
  const int64_t MB = bt.size(1);
  const int64_t* bt_p = bt.data_ptr<int64_t>();
  const int64_t* sl_p = sl.data_ptr<int64_t>();
  // Validate every block the rows will read (serially: no exceptions inside
  // the parallel region).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = sl_p[b];
    TORCH_CHECK(L >= 0 && L <= MB * BS, op, "seq_lens[", b, "] = ", L, " is outside [0, ",
                MB * BS, "] (max_blocks * block_size)");
    for (int64_t j = 0; j < (L + BS - 1) / BS; ++j) {
      const int64_t blk = bt_p[b * MB + j];
      TORCH_CHECK(blk >= 0 && blk < NB, op, "block_table[", b, ", ", j, "] = ", blk,
                  " is outside [0, ", NB, ")");
    }
  }

  const auto fopt = q_in.options().dtype(at::kFloat);
  at::Tensor a_ent = at::zeros({B}, fopt), a_vent = at::zeros({B}, fopt);
  at::Tensor agr = at::zeros({B}, fopt), inter = at::zeros({B}, fopt);
  if (B == 0 || H == 0) return {a_ent, a_vent, agr, inter};
  float* ae_p = a_ent.data_ptr<float>();
  float* av_p = a_vent.data_ptr<float>();
  float* ag_p = agr.data_ptr<float>();
  float* is_p = inter.data_ptr<float>();

  const at::ScalarType kdt = key_cache.scalar_type();
  const char* kbase = static_cast<const char*>(key_cache.data_ptr());
  const int64_t esz = key_cache.element_size();
  const int64_t st0 = key_cache.stride(0), st1 = key_cache.stride(1), st2 = key_cache.stride(2),
                st3 = key_cache.stride(3);
  const float* q_p = q.data_ptr<float>();
  const int64_t G = H / Hkv;
  const float fscale = static_cast<float>(scale);
  const cpu::KernelTable& kt = cpu::kernels();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> S, col, kbuf(D);
    std::vector<uint16_t> hbuf(kdt == at::kFloat ? 0 : D);
    std::vector<double> ent(H);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = sl_p[b];
      if (L == 0) continue;  // zeros
      S.resize(static_cast<size_t>(H * L));
      col.resize(static_cast<size_t>(L));
      const float* qb = q_p + b * H * D;
      // scores, block by block, kv head by kv head (vLLM's cache keeps each
      // head's positions of a block together: this order reads it in sequence)
      for (int64_t j = 0; j * BS < L; ++j) {
        const int64_t blk = bt_p[b * MB + j];
        const int64_t n_in = std::min(BS, L - j * BS);
        for (int64_t g = 0; g < Hkv; ++g) {
          for (int64_t off = 0; off < n_in; ++off) {
            const int64_t k = j * BS + off;
            const char* kp = kbase + (blk * st0 + off * st1 + g * st2) * esz;
            const float* key;
            if (kdt == at::kFloat) {
              if (st3 == 1) {
                key = reinterpret_cast<const float*>(kp);
              } else {
                kt.gather_f32(reinterpret_cast<const float*>(kp), st3, kbuf.data(), D);
                key = kbuf.data();
              }
            } else {
              const uint16_t* src = reinterpret_cast<const uint16_t*>(kp);
              if (st3 != 1) {
                for (int64_t d = 0; d < D; ++d) hbuf[d] = src[d * st3];
                src = hbuf.data();
              }
              if (kdt == at::kBFloat16) {
                kt.bf16_to_f32(src, kbuf.data(), D);
              } else {
                kt.f16_to_f32(src, kbuf.data(), D);
              }
              key = kbuf.data();
            }
            kt.scaled_dots(qb + g * G * D, key, G, D, fscale, S.data() + g * G * L + k, L);
          }
        }
      }
      // per-head entropy, sum |s|, probabilities in place
      int bad = 0;
      double abs_sum = 0.0;
      for (int64_t h = 0; h < H && !bad; ++h) {
        float* row = S.data() + h * L;
        float m;
        kt.chunk_max(row, L, &m, &bad, nullptr);
        if (bad || !(m > -std::numeric_limits<float>::infinity())) {
          bad = 1;
          break;
        }
        double acc[3] = {0.0, 0.0, 0.0};
        kt.chunk_moments(row, L, m, acc);
        ent[h] = std::max(0.0, std::log(acc[0]) - acc[1] / acc[0]) / kLn2;
        abs_sum += kt.softmax_inplace(row, L, m, acc[0]);
      }
      if (bad) {
        ae_p[b] = av_p[b] = ag_p[b] = is_p[b] = nan;
        continue;
      }
      // agreement: mean over heads per key, then summed |P - mean|
      std::fill(col.begin(), col.end(), 0.0f);
      for (int64_t h = 0; h < H; ++h) kt.add_row(S.data() + h * L, col.data(), L);
      kt.scale_row(col.data(), 1.0f / static_cast<float>(H), col.data(), L);
      double dev = 0.0;
      for (int64_t h = 0; h < H; ++h) dev += kt.abs_dev_sum(S.data() + h * L, col.data(), L);
      double mean_e = 0.0;
      for (int64_t h = 0; h < H; ++h) mean_e += ent[h];
      mean_e /= static_cast<double>(H);
      double var_e = 0.0;
      for (int64_t h = 0; h < H; ++h) var_e += (ent[h] - mean_e) * (ent[h] - mean_e);
      var_e /= static_cast<double>(H);
      const double HL = static_cast<double>(H) * static_cast<double>(L);
      ae_p[b] = static_cast<float>(mean_e);
      av_p[b] = static_cast<float>(var_e);
      ag_p[b] = static_cast<float>(dev / HL);
      is_p[b] = static_cast<float>(abs_sum / HL);
    }
  });
  return {a_ent, a_vent, agr, inter};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paged_attention_stats_meta(
    const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "entropix::paged_attention_stats: q must be [B, H, D]");
  const auto fopt = q.options().dtype(at::kFloat);
  const int64_t B = q.size(0);
  return {at::empty({B}, fopt), at::empty({B}, fopt), at::empty({B}, fopt), at::empty({B}, fopt)};
}

}  // namespace entropix
