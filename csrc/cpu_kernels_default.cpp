// Baseline build of the inner loops (whatever the compiler flags target,
// x86-64 SSE2 by default): runs on every CPU.
#include <stdint.h>

#include "cpu_kernels.h"

#define ENTROPIX_ISA_NS isa_default
#define ENTROPIX_ISA_NAME "default"
#include "cpu_kernels_impl.h"
