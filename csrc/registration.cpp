// The `entropix` torch library: schemas, CPU and Meta kernels, and the Python
// module object `entropix_vllm._C` (importing it runs the registrations below;
// the module itself exposes nothing else).

#include <Python.h>

#include <torch/library.h>

#include <string>

#include "dispatch.h"
#include "ops.h"

namespace {

std::string set_cpu_isa(std::string name) { return entropix::cpu::set_isa(name); }
std::string supported_cpu_isas() { return entropix::cpu::supported_isas(); }

}  // namespace

TORCH_LIBRARY(entropix, m) {
  m.def(
      "logit_stats(Tensor logits, int num_candidates) -> (Tensor max, Tensor argmax, "
      "Tensor logsumexp, Tensor entropy, Tensor varentropy, Tensor cand_vals, Tensor cand_ids)");
  m.def(
      "sample_candidates(Tensor cand_vals, Tensor cand_ids, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, Tensor n_draws, Tensor noise) -> Tensor");
  m.def(
      "decide_and_sample(Tensor entropy, Tensor varentropy, Tensor? attn_entropy, "
      "Tensor? attn_varentropy, Tensor? agreement, Tensor? interaction_strength, "
      "Tensor coeff_table, int[] columns, Tensor cand_vals, Tensor cand_ids, Tensor noise, "
      "Tensor argmax, Tensor cot_token, Tensor prev_is_cot, Tensor logits, int k_max) -> "
      "(Tensor tokens, Tensor branch, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor n_draws)");
  m.def(
      "paged_attention_stats(Tensor q, Tensor key_cache, Tensor block_table, Tensor seq_lens, "
      "float scale) -> (Tensor attn_entropy, Tensor attn_varentropy, Tensor agreement, "
      "Tensor interaction_strength)");
  // Instruction-set variant of the CPU inner loops (tests, benchmarks):
  // set_cpu_isa("") queries, "auto" | "default" | "avx2" | "avx512" selects.
  m.def("set_cpu_isa(str name) -> str", &set_cpu_isa);
  m.def("supported_cpu_isas() -> str", &supported_cpu_isas);
}

TORCH_LIBRARY_IMPL(entropix, CPU, m) {
  m.impl("logit_stats", &entropix::logit_stats_cpu);
  m.impl("sample_candidates", &entropix::sample_candidates_cpu);
  m.impl("decide_and_sample", &entropix::decide_and_sample_cpu);
  m.impl("paged_attention_stats", &entropix::paged_attention_stats_cpu);
}

TORCH_LIBRARY_IMPL(entropix, Meta, m) {
  m.impl("logit_stats", &entropix::logit_stats_meta);
  m.impl("sample_candidates", &entropix::sample_candidates_meta);
  m.impl("decide_and_sample", &entropix::decide_and_sample_meta);
  m.impl("paged_attention_stats", &entropix::paged_attention_stats_meta);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C",
      "entropix C++ ops; importing this module registers torch.ops.entropix.*", -1, nullptr,
  };
  return PyModule_Create(&module);
}
