#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

namespace entropix {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// Never calls the table() of a variant the CPU cannot run.
const KernelTable* lookup(const std::string& name) {
  if (name == "default") return isa_default::table();
  if (name == "avx2") return cpu_has_avx2() ? isa_avx2::table() : nullptr;
  if (name == "avx512") return cpu_has_avx512() ? isa_avx512::table() : nullptr;
  return nullptr;
}

const KernelTable* widest() {
  for (const char* n : {"avx512", "avx2"}) {
    if (const KernelTable* t = lookup(n)) return t;
  }
  return isa_default::table();
}

const KernelTable* initial() {
  const char* env = std::getenv("ENTROPIX_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return widest();
  const KernelTable* t = lookup(env);
  // An unusable request falls back to the widest supported variant (a bad
  // environment variable must not break the server).
  return t ? t : widest();
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> a{initial()};
  return a;
}

}  // namespace

const KernelTable& kernels() { return *active().load(std::memory_order_acquire); }

std::string set_isa(const std::string& name) {
  if (!name.empty()) {
    const KernelTable* t = name == "auto" ? widest() : lookup(name);
    TORCH_CHECK(t != nullptr, "entropix: instruction set '", name,
                "' is unknown or not supported here (supported: ", supported_isas(), ")");
    active().store(t, std::memory_order_release);
  }
  return kernels().name;
}

std::string supported_isas() {
  std::string out = "default";
  for (const char* n : {"avx2", "avx512"}) {
    if (lookup(n)) out += std::string(",") + n;
  }
  return out;
}

}  // namespace cpu
}  // namespace entropix
