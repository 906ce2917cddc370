// AVX2 + FMA + F16C build of the inner loops, chosen at run time only on CPUs
// that report those features (see dispatch.cpp). GCC on x86-64 only; elsewhere
// this file provides a null table.
#include <stdint.h>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ENTROPIX_ISA_NS isa_avx2
#define ENTROPIX_ISA_NAME "avx2"
#include "cpu_kernels_impl.h"
#pragma GCC pop_options
#else
namespace entropix { namespace cpu { namespace isa_avx2 {
const KernelTable* table() { return nullptr; }
}}}  // namespace entropix::cpu::isa_avx2
#endif
