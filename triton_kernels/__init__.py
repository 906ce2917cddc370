"""Installed as ``entropix_vllm.triton_kernels``
(not as a top-level ``triton_kernels``, which would shadow the OpenAI package
of that name that vLLM imports).

Triton kernels of entropix-vllm (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

These modules import torch, triton and, of this package, only
``entropix_vllm.contract`` (result types, branch codes, column layout, clamps); they know nothing of vLLM (``tests/reference/test_imports.py``). Entry
points, each the ``"triton"`` implementation of one op of ``entropix_vllm.ops``:

* :func:`entropix_vllm.triton_kernels.logit_stats.fused_logit_stats`
* :func:`entropix_vllm.triton_kernels.candidate_sampling.sample_candidates`
* :func:`entropix_vllm.triton_kernels.entropix_decide.decide_and_sample`
* :func:`entropix_vllm.triton_kernels.attn_stats.paged_attention_stats`

``launch.py`` holds what the launchers share: the device a plan is made for
and the rules that keep every kernel's Triton specialisation key independent
of per-step values (``tests/kernels/test_launch_keys.py``).

Submodules are imported lazily by ``entropix_vllm.ops`` (and only for CUDA
tensors or when the ``"triton"`` backend is named), so that importing this
package never imports triton or compiles anything.
"""
