// entropix::decide_and_sample for CPU tensors: the Entropix decision and the
// token of every row (ops.decide_and_sample is the contract; the tensor-op
// path of torch_ops.decide_and_sample, built on reference.branch_params, is
// what this equals bit for bit).
//
// Per row b, in float64 on the float32 figures:
//   branch: SPEC section 3, the first matching rule wins;
//   the parameters of every branch in reference.branch_params' operation
//   order (torch.maximum/minimum/clamp propagate NaN, torch.round rounds
//   half to even), picked by the branch (argmax: T 0, top_k 1, top_p 1,
//   min_p 0, one draw);
//   the draw (sample_candidates_row) with T, top_p, min_p rounded to float32
//   and clamped in float32 (top_p to [kTopPMin, kTopPMax], min_p to
//   [kMinPMin, kMinPMax]),
//   top_k clamped to [1, k_max], n_draws to [1, N]; only for rows whose
//   figures are finite, whose branch is not argmax and whose float32
//   temperature is > 0 (the others take the argmax);
//   the CoT token for insert rows whose figures are finite when it lies in
//   [0, V), its logit is finite and the previous generated token was not it.
// The columns argument gives, for each enumerator of Col below, its column in
// coeff_table.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "ops.h"

namespace entropix {
namespace {

// Column order of the `columns` argument: entropix_vllm/contract.py's
// DECIDE_COLUMNS, whose short names these are (tests/kernels/test_contract.py reads
// this enum and compares).
enum Col : int {
  T0, P0, K0, M0, LE, ME, HE, LV, HV,
  HELV_OFF, HELV_COEF, HELV_MAX, LEHV_OFF, LEHV_COEF, LEHV_MAX, LEHV_MINK, LEHV_AGREE,
  HEHV_OFF, HEHV_COEF, HEHV_MIN, HEHV_ENT, HEHV_MINP,
  NADA, A_TL, A_TA, A_TG, A_P, A_PMIN, A_PMAX, A_KI, A_KG, A_KMIN, A_KMAX, A_M, A_MMIN, A_MMAX,
  NUM_COLS
};

// contract.ARGMAX ... contract.ADAPTIVE (compared by tests/kernels/test_contract.py).
enum Branch : int64_t { ARGMAX = 0, INSERT_COT = 1, EXPLORE = 2, RESAMPLE = 3, ADAPTIVE = 4 };

// Clamps of the drawn parameters: contract.TOP_P_MIN, TOP_P_MAX, MIN_P_MIN,
// MIN_P_MAX, as float32 (compared by tests/kernels/test_contract.py).
constexpr float kTopPMin = 1e-6f;
constexpr float kTopPMax = 1.0f;
constexpr float kMinPMin = 0.0f;
constexpr float kMinPMax = static_cast<float>(1.0 - 1e-6);

// torch.maximum / torch.minimum: NaN in either operand gives NaN.
inline double tmax(double a, double b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN()
                                          : std::max(a, b);
}
inline double tmin(double a, double b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN()
                                          : std::min(a, b);
}
// torch.clamp on float32 with float scalars (NaN stays NaN).
inline float fclamp(float x, float lo, float hi) {
  return std::isnan(x) ? x : std::min(std::max(x, lo), hi);
}

}  // namespace

DecideOutputs decide_and_sample_cpu(const at::Tensor& entropy_in, const at::Tensor& varentropy_in,
                      const c10::optional<at::Tensor>& attn_entropy,
                      const c10::optional<at::Tensor>& attn_varentropy,
                      const c10::optional<at::Tensor>& agreement,
                      const c10::optional<at::Tensor>& interaction_strength,
                      const at::Tensor& coeff_table_in, at::IntArrayRef columns,
                      const at::Tensor& cand_vals_in, const at::Tensor& cand_ids_in,
                      const at::Tensor& noise_in, const at::Tensor& argmax_in,
                      const at::Tensor& cot_token_in, const at::Tensor& prev_is_cot_in,
                      const at::Tensor& logits, int64_t k_max) {
  const char* op = "entropix::decide_and_sample: ";
  const int64_t B = entropy_in.size(0);
  TORCH_CHECK(entropy_in.dim() == 1 && varentropy_in.sizes() == entropy_in.sizes(), op,
              "entropy and varentropy must be [B]");
  TORCH_CHECK(static_cast<int64_t>(columns.size()) == NUM_COLS, op, "expected ", NUM_COLS,
              " coefficient columns, got ", columns.size());
  TORCH_CHECK(coeff_table_in.dim() == 2 && coeff_table_in.size(0) == B, op,
              "coeff_table must be [B, C], got ", coeff_table_in.sizes());
  for (int64_t c : columns) {
    TORCH_CHECK(c >= 0 && c < coeff_table_in.size(1), op, "column ", c, " out of range");
  }
  TORCH_CHECK(cand_vals_in.dim() == 2 && cand_vals_in.size(0) == B &&
                  cand_ids_in.sizes() == cand_vals_in.sizes(),
              op, "cand_vals/cand_ids must be matching [B, K]");
  const int64_t K = cand_vals_in.size(1);
  TORCH_CHECK(noise_in.dim() == 3 && noise_in.size(0) == B && noise_in.size(2) == K &&
                  noise_in.size(1) >= 1,
              op, "noise must be [B, N >= 1, K], got ", noise_in.sizes());
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) >= 1, op,
              "logits must be [B, V >= 1]");
  for (const at::Tensor* t : {&argmax_in, &cot_token_in, &prev_is_cot_in}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, "per-row tensors must be [", B, "]");
  }
  const bool has_attn = attn_entropy.has_value() && attn_entropy->defined();

  const at::Tensor ent = entropy_in.to(at::kFloat).contiguous();
  const at::Tensor vent = varentropy_in.to(at::kFloat).contiguous();
  at::Tensor a[4];
  if (has_attn) {
    const c10::optional<at::Tensor>* in[4] = {&attn_entropy, &attn_varentropy, &agreement,
                                             &interaction_strength};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(in[i]->has_value() && (*in[i])->dim() == 1 && (*in[i])->size(0) == B, op,
                  "attention figures must be four [B] tensors or none");
      a[i] = (*in[i])->to(at::kFloat).contiguous();
    }
  }
  const at::Tensor table = coeff_table_in.to(at::kDouble).contiguous();
  const at::Tensor cv = cand_vals_in.to(at::kFloat).contiguous();
  const at::Tensor ci = cand_ids_in.to(at::kLong).contiguous();
  const at::Tensor noise = noise_in.to(at::kFloat).contiguous();
  const at::Tensor am = argmax_in.to(at::kLong).contiguous();
  const at::Tensor cot_t = cot_token_in.to(at::kLong).contiguous();
  const at::Tensor prev_t = prev_is_cot_in.to(at::kBool).contiguous();
  const int64_t N = noise.size(1), V = logits.size(1), NC = table.size(1);

  const auto lopt = entropy_in.options();
  at::Tensor tokens = at::empty({B}, lopt.dtype(at::kLong));
  at::Tensor branch = at::empty({B}, lopt.dtype(at::kLong));
  at::Tensor temperature = at::empty({B}, lopt.dtype(at::kFloat));
  at::Tensor top_k = at::empty({B}, lopt.dtype(at::kLong));
  at::Tensor top_p = at::empty({B}, lopt.dtype(at::kFloat));
  at::Tensor min_p = at::empty({B}, lopt.dtype(at::kFloat));
  at::Tensor n_draws = at::empty({B}, lopt.dtype(at::kLong));
  if (B == 0) return {tokens, branch, temperature, top_k, top_p, min_p, n_draws};

  // the CoT token's logit of every row (any float dtype), as double
  std::vector<double> cot_logit(B);
  {
    const int64_t* cp = cot_t.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                    "decide_and_sample", [&] {
      const scalar_t* lp = logits.data_ptr<scalar_t>();
      const int64_t sb = logits.stride(0), sv = logits.stride(1);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t c = std::min<int64_t>(std::max<int64_t>(cp[b], 0), V - 1);
        cot_logit[b] = static_cast<double>(lp[b * sb + c * sv]);
      }
    });
  }

  const float* ep = ent.data_ptr<float>();
  const float* vp = vent.data_ptr<float>();
  const float* ap[4] = {nullptr, nullptr, nullptr, nullptr};
  for (int i = 0; has_attn && i < 4; ++i) ap[i] = a[i].data_ptr<float>();
  const double* tp = table.data_ptr<double>();
  const float* cvp = cv.data_ptr<float>();
  const int64_t* cip = ci.data_ptr<int64_t>();
  const float* zp = noise.data_ptr<float>();
  const int64_t* amp = am.data_ptr<int64_t>();
  const int64_t* cotp = cot_t.data_ptr<int64_t>();
  const bool* prevp = prev_t.data_ptr<bool>();
  int64_t* tok_o = tokens.data_ptr<int64_t>();
  int64_t* br_o = branch.data_ptr<int64_t>();
  float* t_o = temperature.data_ptr<float>();
  int64_t* k_o = top_k.data_ptr<int64_t>();
  float* p_o = top_p.data_ptr<float>();
  float* m_o = min_p.data_ptr<float>();
  int64_t* n_o = n_draws.data_ptr<int64_t>();
  int64_t col[NUM_COLS];
  for (int i = 0; i < NUM_COLS; ++i) col[i] = columns[i];

  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    CandidateScratch scratch(K);
    for (int64_t b = b0; b < b1; ++b) {
      const double* row = tp + b * NC;
      auto c = [&](int i) { return row[col[i]]; };
      const double e = ep[b], v = vp[b];
      const double aE = has_attn ? ap[0][b] : 0.0, aV = has_attn ? ap[1][b] : 0.0;
      const double agr = has_attn ? ap[2][b] : 0.0, IS = has_attn ? ap[3][b] : 0.0;
      const double t0 = c(T0), p0 = c(P0), k0 = c(K0), m0 = c(M0);

      int64_t code = ADAPTIVE;
      if (e < c(LE) && v < c(LV)) code = ARGMAX;
      else if (e > c(HE) && v < c(LV)) code = INSERT_COT;
      else if (e < c(HE) && v > c(HV)) code = EXPLORE;
      else if (e > c(ME) && v > c(HV)) code = RESAMPLE;

      double T, Kf, P, M, Nd = 1.0;
      switch (code) {
        case ARGMAX:
          T = 0.0, Kf = 1.0, P = 1.0, M = 0.0;
          break;
        case INSERT_COT:
          T = tmin(c(HELV_MAX), t0 * (c(HELV_OFF) + c(HELV_COEF) * aE));
          Kf = k0, P = p0, M = m0;
          break;
        case EXPLORE:
          T = tmin(c(LEHV_MAX), t0 * (c(LEHV_OFF) + c(LEHV_COEF) * IS));
          Kf = tmax(c(LEHV_MINK), std::floor(k0 * (1 + c(LEHV_AGREE) * (1 - agr))));
          P = p0, M = m0;
          break;
        case RESAMPLE:
          T = tmax(c(HEHV_MIN), t0 * (c(HEHV_OFF) + c(HEHV_COEF) * aV));
          P = tmax(c(HEHV_MINP), p0 - c(HEHV_ENT) * aE);
          Kf = k0, M = m0;
          break;
        default: {
          const double LU = e + v, AU = aE + aV;
          T = t0 * (1 + c(A_TL) * LU + c(A_TA) * AU - c(A_TG) * agr);
          P = tmax(p0 * (1 + c(A_P) * aV), 0.0);
          P = tmin(tmax(P, c(A_PMIN)), c(A_PMAX));
          Kf = std::nearbyint(k0 * (1 + c(A_KI) * IS - c(A_KG) * agr));
          Kf = tmin(tmax(Kf, c(A_KMIN)), c(A_KMAX));
          M = tmin(tmax(m0 * (1 - c(A_M) * LU), c(A_MMIN)), c(A_MMAX));
          Nd = c(NADA);
        }
      }
      const float t32 = static_cast<float>(T), p32 = static_cast<float>(P);
      const float m32 = static_cast<float>(M);
      const int64_t k64 = static_cast<int64_t>(Kf), n64 = static_cast<int64_t>(Nd);
      br_o[b] = code, t_o[b] = t32, k_o[b] = k64, p_o[b] = p32, m_o[b] = m32, n_o[b] = n64;

      const bool sane = std::isfinite(ep[b]) && std::isfinite(vp[b]);
      int64_t tok = amp[b];
      if (sane && code != ARGMAX && t32 > 0.0f) {
        tok = sample_candidates_row(
            cvp + b * K, cip + b * K, K, t32, std::min<int64_t>(std::max<int64_t>(k64, 1), k_max),
            fclamp(p32, kTopPMin, kTopPMax), fclamp(m32, kMinPMin, kMinPMax),
            std::min<int64_t>(std::max<int64_t>(n64, 1), N), zp + b * N * K, N, scratch);
      }
      const int64_t cot = cotp[b];
      if (code == INSERT_COT && sane && cot >= 0 && cot < V && std::isfinite(cot_logit[b]) &&
          !prevp[b]) {
        tok = cot;
      }
      tok_o[b] = tok;
    }
  });
  return {tokens, branch, temperature, top_k, top_p, min_p, n_draws};
}

DecideOutputs decide_and_sample_meta(const at::Tensor& entropy, const at::Tensor& varentropy,
                       const c10::optional<at::Tensor>& attn_entropy,
                       const c10::optional<at::Tensor>& attn_varentropy,
                       const c10::optional<at::Tensor>& agreement,
                       const c10::optional<at::Tensor>& interaction_strength,
                       const at::Tensor& coeff_table, at::IntArrayRef columns,
                       const at::Tensor& cand_vals, const at::Tensor& cand_ids,
                       const at::Tensor& noise, const at::Tensor& argmax,
                       const at::Tensor& cot_token, const at::Tensor& prev_is_cot,
                       const at::Tensor& logits, int64_t k_max) {
  TORCH_CHECK(entropy.dim() == 1, "entropix::decide_and_sample: entropy must be [B]");
  const int64_t B = entropy.size(0);
  const auto o = entropy.options();
  return {at::empty({B}, o.dtype(at::kLong)), at::empty({B}, o.dtype(at::kLong)),
          at::empty({B}, o.dtype(at::kFloat)), at::empty({B}, o.dtype(at::kLong)),
          at::empty({B}, o.dtype(at::kFloat)), at::empty({B}, o.dtype(at::kFloat)),
          at::empty({B}, o.dtype(at::kLong))};
}

}  // namespace entropix
