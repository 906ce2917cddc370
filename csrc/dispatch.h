// Run-time choice of the instruction-set variant of the inner loops.
#pragma once

#include <string>

#include "cpu_kernels.h"

namespace entropix {
namespace cpu {

// The active kernel table. Chosen on first use: the widest variant the CPU
// supports, or the one named by the environment variable ENTROPIX_CPU_ISA
// ("default", "avx2", "avx512"; "auto" or unset = widest supported).
const KernelTable& kernels();

// Selects a variant by name ("auto", "default", "avx2", "avx512") and returns
// the name of the active one; "" only queries. Raises (c10::Error) for an
// unknown name or a variant this CPU / build does not support. Not meant to be
// called while ops run on other threads (tests and benchmarks use it).
std::string set_isa(const std::string& name);

// Names of the variants usable on this CPU with this build, widest last.
std::string supported_isas();

}  // namespace cpu
}  // namespace entropix
