// entropix::sample_candidates for CPU tensors: SPEC section 4 on each row's
// top-K candidates (ops.sample_candidates is the contract; the float64
// reference is reference.filter_logits + reference.race as combined by
// ops.reference_sample_candidates).
//
// Per row b (all arithmetic in float64 on the float32 inputs):
//   s_c   = v_c / T            (non-finite v_c -> -inf)
//   min_p: keep s_c finite with s_c - max(s) >= log(min_p)
//   order the candidates by s descending, ties by candidate position (stable)
//   top_k: keep the first top_k positions of that order
//   top_p: p = softmax of the kept s; keep position r when the mass before it
//          (inclusive running sum minus p_r, as the reference computes it)
//          is < top_p
//   draw j (0 <= j < max(1, min(n_draws, N))): c_j = argmax over kept c of
//          s_c - log(noise[b, j, c]) (first index on ties; every candidate
//          filtered out -> candidate 0)
//   result: cand_ids[b, c_j] for the draw with the largest raw value v_c
//          (strictly larger replaces; ties keep the earlier draw).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.h"

namespace entropix {

int64_t sample_candidates_row(const float* v, const int64_t* ids, int64_t K, float temperature,
                              int64_t top_k, float top_p_f, float min_p, int64_t n_draws,
                              const float* zb, int64_t N, CandidateScratch& scratch) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  std::vector<double>& s = scratch.s;
  std::vector<double>& filt = scratch.filt;
  std::vector<int64_t>& order = scratch.order;
  const double T = static_cast<double>(temperature);
  // temperature and min_p
  double mx = -inf;
  for (int64_t c = 0; c < K; ++c) {
    const double x = static_cast<double>(v[c]);
    s[c] = std::isfinite(x) ? x / T : -inf;
    mx = std::max(mx, s[c]);
  }
  const double log_mp = std::log(std::max(0.0, static_cast<double>(min_p)));
  for (int64_t c = 0; c < K; ++c) {
    const bool keep = std::isfinite(s[c]) && (s[c] - mx >= log_mp);
    if (!keep) s[c] = -inf;
  }
  // descending order, ties by position
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return s[a] > s[c]; });
  // top_k on that order
  const int64_t kk = std::max<int64_t>(0, std::min<int64_t>(top_k, K));
  std::fill(filt.begin(), filt.end(), -inf);
  double m2 = -inf;
  for (int64_t r = 0; r < kk; ++r) m2 = std::max(m2, s[order[r]]);
  if (m2 > -inf) {
    // top_p on the renormalised survivors, in the sorted order
    double z = 0.0;
    for (int64_t r = 0; r < kk; ++r) {
      const double x = s[order[r]];
      if (x > -inf) z += std::exp(x - m2);
    }
    const double top_p = static_cast<double>(top_p_f);
    double cum = 0.0;
    for (int64_t r = 0; r < kk; ++r) {
      const double x = s[order[r]];
      const double p = x > -inf ? std::exp(x - m2) / z : 0.0;
      cum += p;
      if (x > -inf && cum - p < top_p) filt[order[r]] = x;
    }
  }
  // exponential races
  const int64_t draws = std::min<int64_t>(N, std::max<int64_t>(1, n_draws));
  int64_t best_c = 0;
  double best_v = 0.0;
  for (int64_t j = 0; j < draws; ++j) {
    const float* zj = zb + j * K;
    int64_t cj = 0;
    double sc_best = -inf;
    for (int64_t c = 0; c < K; ++c) {
      if (!(filt[c] > -inf)) continue;
      const double sc = filt[c] - std::log(static_cast<double>(zj[c]));
      if (sc > sc_best) {
        sc_best = sc;
        cj = c;
      }
    }
    const double vj = static_cast<double>(v[cj]);
    if (j == 0 || vj > best_v) {
      best_c = cj;
      best_v = vj;
    }
  }
  return ids[best_c];
}

at::Tensor sample_candidates_cpu(const at::Tensor& cand_vals_in, const at::Tensor& cand_ids_in,
                                 const at::Tensor& temperature_in, const at::Tensor& top_k_in,
                                 const at::Tensor& top_p_in, const at::Tensor& min_p_in,
                                 const at::Tensor& n_draws_in, const at::Tensor& noise_in) {
  const char* op = "entropix::sample_candidates: ";
  for (const at::Tensor* t : {&cand_vals_in, &cand_ids_in, &temperature_in, &top_k_in, &top_p_in,
                              &min_p_in, &n_draws_in, &noise_in}) {
    TORCH_CHECK(t->device().is_cpu(), op, "expected CPU tensors, got ", t->device());
  }
  TORCH_CHECK(cand_vals_in.dim() == 2, op, "cand_vals must be [B, K], got ", cand_vals_in.sizes());
  const int64_t B = cand_vals_in.size(0), K = cand_vals_in.size(1);
  TORCH_CHECK(cand_ids_in.sizes() == cand_vals_in.sizes(), op, "cand_ids ", cand_ids_in.sizes(),
              " must match cand_vals ", cand_vals_in.sizes());
  for (const at::Tensor* t : {&temperature_in, &top_k_in, &top_p_in, &min_p_in, &n_draws_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, "per-row parameters must be [", B,
                "], got ", t->sizes());
  }
  TORCH_CHECK(noise_in.dim() == 3 && noise_in.size(0) == B && noise_in.size(2) == K &&
                  noise_in.size(1) >= 1,
              op, "noise must be [B, N >= 1, K] = [", B, ", N, ", K, "], got ", noise_in.sizes());
  TORCH_CHECK(K >= 1 || B == 0, op, "need at least one candidate per row");
  TORCH_CHECK(at::isFloatingType(cand_vals_in.scalar_type()), op, "cand_vals must be floating");
  TORCH_CHECK(!at::isFloatingType(cand_ids_in.scalar_type()), op, "cand_ids must be integer");

  const at::Tensor vals = cand_vals_in.to(at::kFloat).contiguous();
  const at::Tensor ids = cand_ids_in.to(at::kLong).contiguous();
  const at::Tensor temp = temperature_in.to(at::kFloat).contiguous();
  const at::Tensor topk = top_k_in.to(at::kLong).contiguous();
  const at::Tensor topp = top_p_in.to(at::kFloat).contiguous();
  const at::Tensor minp = min_p_in.to(at::kFloat).contiguous();
  const at::Tensor ndraw = n_draws_in.to(at::kLong).contiguous();
  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  const int64_t N = noise.size(1);

  at::Tensor out = at::empty({B}, cand_vals_in.options().dtype(at::kLong));
  if (B == 0) return out;

  const float* v_p = vals.data_ptr<float>();
  const int64_t* id_p = ids.data_ptr<int64_t>();
  const float* t_p = temp.data_ptr<float>();
  const int64_t* k_p = topk.data_ptr<int64_t>();
  const float* pp_p = topp.data_ptr<float>();
  const float* mp_p = minp.data_ptr<float>();
  const int64_t* n_p = ndraw.data_ptr<int64_t>();
  const float* z_p = noise.data_ptr<float>();
  int64_t* o_p = out.data_ptr<int64_t>();

  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    CandidateScratch scratch(K);
    for (int64_t b = b0; b < b1; ++b) {
      o_p[b] = sample_candidates_row(v_p + b * K, id_p + b * K, K, t_p[b], k_p[b], pp_p[b],
                                     mp_p[b], n_p[b], z_p + b * N * K, N, scratch);
    }
  });
  return out;
}

at::Tensor sample_candidates_meta(const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                                  const at::Tensor& temperature, const at::Tensor& top_k,
                                  const at::Tensor& top_p, const at::Tensor& min_p,
                                  const at::Tensor& n_draws, const at::Tensor& noise) {
  TORCH_CHECK(cand_vals.dim() == 2, "entropix::sample_candidates: cand_vals must be [B, K]");
  return at::empty({cand_vals.size(0)}, cand_vals.options().dtype(at::kLong));
}

}  // namespace entropix
