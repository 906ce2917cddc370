"""Installed as ``entropix_vllm.triton_kernels``
(not as a top-level ``triton_kernels``, which would shadow the OpenAI package
of that name that vLLM imports).

Triton kernels of entropix-vllm (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

These modules import only torch, triton and the reference/config modules of
``entropix_vllm``; they know nothing of vLLM. Entry points:

* :func:`entropix_vllm.triton_kernels.logit_stats.fused_logit_stats`
* :func:`entropix_vllm.triton_kernels.candidate_sampling.sample_candidates`
* :func:`entropix_vllm.triton_kernels.entropix_decide.decide_and_sample`
* :func:`entropix_vllm.triton_kernels.attn_stats.paged_attention_stats`

Submodules are imported lazily by ``entropix_vllm.ops`` so that importing this
package never compiles anything.
"""
