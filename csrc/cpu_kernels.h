// Table of the vectorised inner loops used by the CPU ops, one table per
// instruction set (see cpu_kernels_impl.h). Only C types here: this header is
// included before an instruction-set pragma.
#pragma once

#include <stdint.h>

namespace entropix {
namespace cpu {

struct KernelTable {
  const char* name;  // "default", "avx2" or "avx512"
  // dst[i] = float(src[i]) for bfloat16 / float16 bit patterns, i < n.
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  void (*f16_to_f32)(const uint16_t* src, float* dst, int64_t n);
  // Maximum ignoring NaN (-inf if none); sets *bad = 1 on NaN or +inf; when
  // bmax is not null, also the maximum of each block of 32 values.
  void (*chunk_max)(const float* x, int64_t n, float* out_max, int* bad, float* bmax);
  // acc[0..2] += sum over i of (e^d, d e^d, d^2 e^d), d = x[i] - m, in float64.
  void (*chunk_moments)(const float* x, int64_t n, float m, double* acc);
  // out[g * out_stride] = scale * <q[g*D .. g*D+D), k[0..D)>, g < G.
  void (*scaled_dots)(const float* q, const float* k, int64_t G, int64_t D, float scale,
                      float* out, int64_t out_stride);
  // dst[i] = src[i * stride], i < n.
  void (*gather_f32)(const float* src, int64_t stride, float* dst, int64_t n);
  // s[i] <- e^(s[i] - m) / s0 in place; returns sum |s[i]| of the old values.
  double (*softmax_inplace)(float* s, int64_t n, float m, double s0);
  // col[i] += p[i].
  void (*add_row)(const float* p, float* col, int64_t n);
  // sum |p[i] - mean[i]| in float64.
  double (*abs_dev_sum)(const float* p, const float* mean, int64_t n);
  // dst[i] = src[i] * a.
  void (*scale_row)(const float* src, float a, float* dst, int64_t n);
};

// Per instruction set; nullptr when that variant is not compiled in.
namespace isa_default { const KernelTable* table(); }
namespace isa_avx2 { const KernelTable* table(); }
namespace isa_avx512 { const KernelTable* table(); }

}  // namespace cpu
}  // namespace entropix
