// Vectorisable inner loops of the CPU ops, compiled once per instruction set.
//
// This file is included (never on its own) by cpu_kernels_default.cpp,
// cpu_kernels_avx2.cpp and cpu_kernels_avx512.cpp. Each of those defines
// ENTROPIX_ISA_NS and ENTROPIX_ISA_NAME, includes <stdint.h> and
// cpu_kernels.h, optionally switches the code generator to a wider
// instruction set with `#pragma GCC target(...)`, and then includes this file.
//
// Rules that keep the three copies apart and the binary portable:
//  * no system or torch header is included here (their inline functions would
//    otherwise be compiled with the wider instruction set and could be picked by
//    the linker for code that runs on any CPU);
//  * every helper is `static inline` (internal linkage), every kernel lives in
//    namespace ENTROPIX_ISA_NS;
//  * only the loops below are vectorised, by the compiler (-O3 plus
//    `#pragma omp simd` for the floating-point reductions, which the compiler
//    may not reorder on its own); there are no intrinsics, so the same source is
//    correct on any CPU and only the width changes.
//
// Numerics: exponentials are computed in float32 (about 1 ulp); every sum that
// feeds entropy or varentropy is accumulated in float64.

namespace entropix {
namespace cpu {
namespace ENTROPIX_ISA_NS {

static inline float bits_to_f32(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

// e^x for x <= 0 (float32, max error about 1 ulp).
// x < -87 (including -inf) gives exactly 0: e^-87 = 1.6e-38 is negligible next
// to the 1 every caller's sum already holds (the running maximum's own term).
// NaN input is not supported (callers never pass it).
static inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // x = n ln2 + r, |r| <= ln2 / 2; n rounded to nearest with the 1.5 * 2^23
  // trick (exact without -ffast-math, which this project never uses).
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;
  float r = xc - fn * 0.693359375f;    // ln2, high part (exact product)
  r = r - fn * -2.12194440e-4f;        // ln2, low part
  // Minimax polynomial for (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = (int32_t)fn;  // in [-126, 0]
  const float two_n = bits_to_f32((uint32_t)(n + 127) << 23);
  const float y = p * two_n;
  // Select without a branch (a branch around the polynomial would stop the
  // vectoriser when floating-point traps are assumed observable).
  const uint32_t keep = 0u - (uint32_t)(x >= -87.0f);
  return bits_to_f32(f32_to_bits(y) & keep);
}

// ---------------------------------------------------------------------------
// Conversions to float32 (exact; bit manipulation so that they vectorise).
// ---------------------------------------------------------------------------
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_f32((uint32_t)src[i] << 16);
}

// IEEE binary16 -> binary32, exact and branch-free.
//  * normal, inf and NaN halves: shifting the 15 exponent+mantissa bits left by
//    13 puts them in the float layout with float exponent field e_h (the half
//    one); adding 0x70000000 raises that field by 224, so a half exponent of
//    31 (inf / NaN) becomes 255 (inf / NaN), and the value 2^(e_h + 97) * 1.m
//    times 2^-112 is the half's value 2^(e_h - 15) * 1.m (exact: a power of 2);
//  * subnormal halves (exponent 0, mantissa m, value m * 2^-24): the float
//    with exponent field 126 and mantissa m (shifted by 0) is 0.5 + m * 2^-24,
//    and subtracting 0.5 is exact.
void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i];
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t mag = h & 0x7fffu;
    const float normal = bits_to_f32((mag << 13) + 0x70000000u) * 0x1p-112f;
    const float sub = bits_to_f32(mag | 0x3f000000u) - 0.5f;
    const uint32_t out = (mag < 0x0400u) ? f32_to_bits(sub) : f32_to_bits(normal);
    dst[i] = bits_to_f32(sign | out);
  }
}

// ---------------------------------------------------------------------------
// Logit / score rows.
// ---------------------------------------------------------------------------

// Maximum of x[0..n) ignoring NaN (-inf when n == 0 or everything is -inf or
// NaN); *bad is set to 1 when the chunk holds a NaN or +inf, else left alone.
// When bmax is not null it receives the maximum of each block of 32 values
// (bmax[j] for x[32j .. 32j+32), the last block possibly shorter).
void chunk_max(const float* x, int64_t n, float* out_max, int* bad, float* bmax) {
  const float inf = __builtin_inff();
  int b = 0;
#pragma omp simd reduction(| : b)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    b |= (int)((v != v) | (v == inf));
  }
  if (b) *bad = 1;
  float m = -inf;
  if (bmax == nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    *out_max = m;
    return;
  }
  int64_t i = 0, j = 0;
  for (; i + 32 <= n; i += 32, ++j) {
    const float* xb = x + i;
    float mb = -inf;
#pragma omp simd reduction(max : mb)
    for (int k = 0; k < 32; ++k) mb = xb[k] > mb ? xb[k] : mb;
    bmax[j] = mb;
    m = mb > m ? mb : m;
  }
  if (i < n) {
    float mb = -inf;
    for (; i < n; ++i) mb = x[i] > mb ? x[i] : mb;
    bmax[j] = mb;
    m = mb > m ? mb : m;
  }
  *out_max = m;
}

// Adds the max-shifted moments of x[0..n) to acc[0..2] (float64):
// with d = x - m (m finite, m >= every x), acc += (sum e^d, sum d e^d,
// sum d^2 e^d). -inf entries contribute nothing (d is clamped to -104 before
// the exponential, which then returns exactly 0, so d * 0 = 0, never NaN).
void chunk_moments(const float* x, int64_t n, float m, double* acc) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    float d = x[i] - m;
    d = d < -104.0f ? -104.0f : d;
    const double e = (double)exp_nonpos(d);
    const double dd = (double)d;
    const double de = dd * e;
    s0 += e;
    s1 += de;
    s2 += dd * de;
  }
  acc[0] += s0;
  acc[1] += s1;
  acc[2] += s2;
}

// ---------------------------------------------------------------------------
// Attention rows.
// ---------------------------------------------------------------------------

// out[g] = scale * <q[g, 0..D), k[0..D)> for g < G; q rows are D apart.
void scaled_dots(const float* q, const float* k, int64_t G, int64_t D, float scale, float* out,
                 int64_t out_stride) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += qg[d] * k[d];
    out[g * out_stride] = scale * acc;
  }
}

// Gathers n elements `stride` apart into dst (float32 source).
void gather_f32(const float* src, int64_t stride, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

// In place: s[0..n) (max m, sum of e^(s - m) = s0) -> probabilities
// e^(s - m) / s0; returns sum |s| (float64) of the scores it overwrote.
double softmax_inplace(float* s, int64_t n, float m, double s0) {
  const float inv = (float)(1.0 / s0);
  double abs_sum = 0.0;
#pragma omp simd reduction(+ : abs_sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = s[i];
    abs_sum += (double)__builtin_fabsf(v);
    float d = v - m;
    d = d < -104.0f ? -104.0f : d;
    s[i] = exp_nonpos(d) * inv;
  }
  return abs_sum;
}

// col[k] += p[k] for k < n.
void add_row(const float* p, float* col, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) col[i] += p[i];
}

// sum_k |p[k] - mean[k]| in float64.
double abs_dev_sum(const float* p, const float* mean, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i] - mean[i];
    acc += (double)__builtin_fabsf(v);
  }
  return acc;
}

// dst[k] = src[k] * a.
void scale_row(const float* src, float a, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * a;
}

const KernelTable* table() {
  static const KernelTable t = {
      ENTROPIX_ISA_NAME, bf16_to_f32,     f16_to_f32,      chunk_max, chunk_moments,
      scaled_dots,       gather_f32,      softmax_inplace, add_row,   abs_dev_sum,
      scale_row,
  };
  return &t;
}

}  // namespace ENTROPIX_ISA_NS
}  // namespace cpu
}  // namespace entropix
