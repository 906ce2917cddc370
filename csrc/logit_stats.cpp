// entropix::logit_stats for CPU tensors: one read of each logits row gives the
// max, argmax, logsumexp, entropy, varentropy (SPEC section 1) and the top-K
// candidates (ops.logit_stats_and_candidates is the contract).
//
// Work split: a task is one row, or one vocabulary slice of a row when the
// batch is too small to keep every thread busy (B < 2 * threads and V large).
// A task walks its slice in chunks of kChunk values (8 KiB of float32, L1
// resident): the chunk's maximum (and the maximum of each block of 32 values),
// then the max-shifted moments S0 = sum e^d, S1 = sum d e^d, S2 = sum d^2 e^d
// (d = x - running max, accumulated in float64, rescaled when the running max
// rises).
//
// Candidates come from the block maxima: the K-th largest block maximum tau is
// a value held by some entry and at most K-1 blocks beat it, so at least K
// entries are >= tau and every entry of the top K is >= tau; only the blocks
// whose maximum is >= tau (typically K to 2K of them, 32 values each) are read
// again, their entries >= tau collected and the best K kept (larger value
// first, lower id first among equal values). Slices of a row are merged
// afterwards in vocabulary order (the same rescaling, so the lowest id wins
// argmax ties, and the best K of the union of the slices' candidates).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

constexpr int64_t kChunk = 2048;        // values per chunk (L1 resident)
constexpr int64_t kMinSlice = 16384;    // smallest vocabulary slice given its own task
constexpr double kLn2 = 0.69314718055994530942;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Cand {
  float v;
  int64_t id;
};

// Candidate order: larger value first, lower token id first among equals.
inline bool cand_before(const Cand& a, const Cand& b) {
  return a.v > b.v || (a.v == b.v && a.id < b.id);
}

// Running statistics of one task; s[] are relative to m.
struct Partial {
  float m = -kInf;  // running max (ignores NaN)
  int64_t am = 0;   // lowest id holding m
  double s[3] = {0.0, 0.0, 0.0};
  int bad = 0;       // saw NaN or +inf
  int64_t ncand = 0;
};

// Re-expresses moments taken around an old max around a new one:
// delta = old - new < 0, d' = d + delta, e^d' = f e^d with f = e^delta.
inline void rescale(double* s, double delta) {
  if (delta == 0.0) return;
  if (delta < -745.0) {  // f underflows: the old terms vanish next to the new max's 1
    s[0] = s[1] = s[2] = 0.0;
    return;
  }
  const double f = std::exp(delta);
  const double s0 = s[0], s1 = s[1], s2 = s[2];
  s[2] = f * (s2 + 2.0 * delta * s1 + delta * delta * s0);
  s[1] = f * (s1 + delta * s0);
  s[0] = f * s0;
}

// Pointer to float32 values [c0, c0 + n) of a row (converted into tmp for
// bfloat16 / float16 rows).
inline const float* load(const cpu::KernelTable& kt, const void* row, at::ScalarType dt,
                         int64_t c0, int64_t n, float* tmp) {
  if (dt == at::kFloat) return static_cast<const float*>(row) + c0;
  const uint16_t* src = static_cast<const uint16_t*>(row) + c0;
  if (dt == at::kBFloat16) {
    kt.bf16_to_f32(src, tmp, n);
  } else {
    kt.f16_to_f32(src, tmp, n);
  }
  return tmp;
}

// Per-thread scratch.
struct Scratch {
  std::vector<float> tmp;   // kChunk converted values (bfloat16 / float16 rows)
  std::vector<float> bmax;  // block maxima of the slice
  std::vector<float> sel;   // block maxima, reordered by nth_element
  std::vector<Cand> cand;   // collected candidates
};

// Statistics of row values [lo, hi) into p; when K > 0 also the slice's best
// min(K, #entries above -inf) candidates into out (sorted), their count in
// p.ncand. `row` points at the row's first element (dtype dt).
void process_slice(const cpu::KernelTable& kt, const void* row, at::ScalarType dt, int64_t lo,
                   int64_t hi, int64_t K, Partial& p, Cand* out, Scratch& sc) {
  const int64_t len = hi - lo;
  const int64_t nblocks = (len + 31) / 32;
  if (K > 0) sc.bmax.resize(static_cast<size_t>(nblocks));
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    const float* x = load(kt, row, dt, c0, n, sc.tmp.data());
    float cm;
    int bad = 0;
    kt.chunk_max(x, n, &cm, &bad, K > 0 ? sc.bmax.data() + (c0 - lo) / 32 : nullptr);
    if (bad) p.bad = 1;
    if (cm > p.m) {
      int64_t i = 0;
      while (x[i] != cm) ++i;  // first occurrence: lowest id on ties
      if (!p.bad && p.m > -kInf) rescale(p.s, static_cast<double>(p.m) - static_cast<double>(cm));
      p.m = cm;
      p.am = c0 + i;
    }
    if (!p.bad && cm > -kInf) kt.chunk_moments(x, n, p.m, p.s);
  }
  p.ncand = 0;
  if (K == 0 || !(p.m > -kInf)) return;  // no entry above -inf: only padding
  // Threshold: the K-th largest block maximum (-inf when fewer than K blocks).
  float tau = -kInf;
  if (nblocks >= K) {
    sc.sel.assign(sc.bmax.begin(), sc.bmax.end());
    std::nth_element(sc.sel.begin(), sc.sel.begin() + (K - 1), sc.sel.end(),
                     [](float a, float b) { return a > b; });
    tau = sc.sel[K - 1];
  }
  // Collect entries >= tau (> -inf when tau is -inf: -inf is never a candidate).
  sc.cand.clear();
  for (int64_t j = 0; j < nblocks; ++j) {
    const float bm = sc.bmax[j];
    if (!(bm >= tau) || bm == -kInf) continue;
    const int64_t c0 = lo + j * 32, n = std::min<int64_t>(32, hi - c0);
    const float* x = load(kt, row, dt, c0, n, sc.tmp.data());
    for (int64_t i = 0; i < n; ++i) {
      if (x[i] >= tau && x[i] > -kInf) sc.cand.push_back(Cand{x[i], c0 + i});
    }
  }
  const int64_t take = std::min<int64_t>(K, static_cast<int64_t>(sc.cand.size()));
  std::partial_sort(sc.cand.begin(), sc.cand.begin() + take, sc.cand.end(), cand_before);
  std::copy(sc.cand.begin(), sc.cand.begin() + take, out);
  p.ncand = take;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logit_stats_cpu(const at::Tensor& logits_in, int64_t num_candidates) {
  TORCH_CHECK(logits_in.device().is_cpu(), "entropix::logit_stats: expected a CPU tensor, got ",
              logits_in.device());
  TORCH_CHECK(logits_in.dim() == 2, "entropix::logit_stats: logits must be [B, V], got shape ",
              logits_in.sizes());
  const at::ScalarType dt = logits_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "entropix::logit_stats: logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(num_candidates >= 0 && num_candidates <= kMaxCandidates,
              "entropix::logit_stats: num_candidates must be in [0, ", kMaxCandidates, "], got ",
              num_candidates);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1), K = num_candidates;

  const auto fopt = logits.options().dtype(at::kFloat);
  const auto lopt = logits.options().dtype(at::kLong);
  at::Tensor mx = at::empty({B}, fopt), am = at::empty({B}, lopt), lse = at::empty({B}, fopt);
  at::Tensor ent = at::empty({B}, fopt), vent = at::empty({B}, fopt);
  at::Tensor cv = at::empty({B, K}, fopt), ci = at::empty({B, K}, lopt);
  if (B == 0) return {mx, am, lse, ent, vent, cv, ci};

  // Vocabulary slices per row: enough tasks for every thread when B is small.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nsplit = 1;
  if (B < 2 * threads) {
    const int64_t want = (2 * threads + B - 1) / B;
    nsplit = std::max<int64_t>(1, std::min(want, V / kMinSlice));
  }
  int64_t slice = (V + nsplit - 1) / nsplit;
  slice = std::max<int64_t>(kChunk, (slice + kChunk - 1) / kChunk * kChunk);
  nsplit = std::max<int64_t>(1, (V + slice - 1) / slice);
  const int64_t tasks = B * nsplit;
  const int64_t cap = K;  // candidates kept per task

  std::vector<Partial> parts(tasks);
  std::vector<Cand> cands(static_cast<size_t>(tasks * cap));
  const cpu::KernelTable& kt = cpu::kernels();
  const char* base = static_cast<const char*>(logits.data_ptr());
  const int64_t row_bytes = V * static_cast<int64_t>(logits.element_size());

  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Scratch sc;
    sc.tmp.resize(dt == at::kFloat ? 0 : kChunk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / nsplit, s = t % nsplit;
      const int64_t lo = s * slice, hi = std::min(V, lo + slice);
      process_slice(kt, base + r * row_bytes, dt, lo, hi, K, parts[t], cands.data() + t * cap, sc);
    }
  });

  float* mx_p = mx.data_ptr<float>();
  int64_t* am_p = am.data_ptr<int64_t>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  float* vent_p = vent.data_ptr<float>();
  float* cv_p = cv.data_ptr<float>();
  int64_t* ci_p = ci.data_ptr<int64_t>();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  at::parallel_for(0, B, 8, [&](int64_t r0, int64_t r1) {
    std::vector<Cand> merged;
    for (int64_t r = r0; r < r1; ++r) {
      const Partial* pr = parts.data() + r * nsplit;
      // Merge the slices (in vocabulary order: the first slice holding the
      // max gives the argmax, i.e. the lowest id).
      int bad = 0;
      float M = -kInf;
      int64_t amax = 0;
      for (int64_t s = 0; s < nsplit; ++s) {
        bad |= pr[s].bad;
        if (pr[s].m > M) {
          M = pr[s].m;
          amax = pr[s].am;
        }
      }
      if (bad) {
        mx_p[r] = lse_p[r] = ent_p[r] = vent_p[r] = nan;
        am_p[r] = 0;
      } else if (M == -kInf) {
        mx_p[r] = lse_p[r] = -kInf;
        ent_p[r] = vent_p[r] = 0.0f;
        am_p[r] = 0;
      } else {
        double S[3] = {0.0, 0.0, 0.0};
        for (int64_t s = 0; s < nsplit; ++s) {
          if (!(pr[s].m > -kInf)) continue;
          double t[3] = {pr[s].s[0], pr[s].s[1], pr[s].s[2]};
          rescale(t, static_cast<double>(pr[s].m) - static_cast<double>(M));
          S[0] += t[0];
          S[1] += t[1];
          S[2] += t[2];
        }
        // S0 >= 1 (the max's own term), so the logs and ratios are safe.
        const double log_s0 = std::log(S[0]);
        const double mean_d = S[1] / S[0];
        const double h_nats = std::max(0.0, log_s0 - mean_d);
        const double v_nats = std::max(0.0, S[2] / S[0] - mean_d * mean_d);
        mx_p[r] = M;
        am_p[r] = amax;
        lse_p[r] = static_cast<float>(static_cast<double>(M) + log_s0);
        ent_p[r] = static_cast<float>(h_nats / kLn2);
        vent_p[r] = static_cast<float>(v_nats / (kLn2 * kLn2));
      }
      if (K == 0) continue;
      // Candidates: the K best of the slices' buffers, sorted.
      merged.clear();
      for (int64_t s = 0; s < nsplit; ++s) {
        const Cand* c = cands.data() + (r * nsplit + s) * cap;
        merged.insert(merged.end(), c, c + pr[s].ncand);
      }
      const int64_t take = std::min<int64_t>(K, static_cast<int64_t>(merged.size()));
      std::partial_sort(merged.begin(), merged.begin() + take, merged.end(), cand_before);
      float* ov = cv_p + r * K;
      int64_t* oi = ci_p + r * K;
      for (int64_t j = 0; j < take; ++j) {
        ov[j] = merged[j].v;
        oi[j] = merged[j].id;
      }
      for (int64_t j = take; j < K; ++j) {  // fewer than K values above -inf
        ov[j] = -kInf;
        oi[j] = 0;
      }
    }
  });
  return {mx, am, lse, ent, vent, cv, ci};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
logit_stats_meta(const at::Tensor& logits, int64_t num_candidates) {
  TORCH_CHECK(logits.dim() == 2, "entropix::logit_stats: logits must be [B, V]");
  const int64_t B = logits.size(0);
  const auto fopt = logits.options().dtype(at::kFloat);
  const auto lopt = logits.options().dtype(at::kLong);
  return {at::empty({B}, fopt), at::empty({B}, lopt), at::empty({B}, fopt),
          at::empty({B}, fopt), at::empty({B}, fopt), at::empty({B, num_candidates}, fopt),
          at::empty({B, num_candidates}, lopt)};
}

}  // namespace entropix
