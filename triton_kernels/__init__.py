"""Triton kernels of entropix-vllm (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

These modules import only torch, triton and the reference/config modules of
``entropix_vllm``; they know nothing of vLLM. Entry points:

* :func:`triton_kernels.logit_stats.fused_logit_stats`
* :func:`triton_kernels.candidate_sampling.sample_candidates`

Submodules are imported lazily by ``entropix_vllm.ops`` so that importing this
package never compiles anything.
"""
