// AVX-512 (F, BW, DQ, VL) build of the inner loops, chosen at run time only on
// CPUs that report those features (see dispatch.cpp). GCC on x86-64 only;
// elsewhere this file provides a null table.
#include <stdint.h>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define ENTROPIX_ISA_NS isa_avx512
#define ENTROPIX_ISA_NAME "avx512"
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#else
namespace entropix { namespace cpu { namespace isa_avx512 {
const KernelTable* table() { return nullptr; }
}}}  // namespace entropix::cpu::isa_avx512
#endif
