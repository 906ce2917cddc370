"""Triton's specialisation key of every kernel launch the public launchers make,
computed without a GPU (run as a script by ``tests/kernels/test_launch_keys.py``).

Triton compiles a kernel once per key; a key that changes from one decode step
to the next is a recompilation on the GPU. This script, in its own process
(``TRITON_INTERPRET`` unset: the kernels are real ``JITFunction`` objects):

* replaces ``JITFunction.run`` (what ``kernel[grid](...)`` calls) by a
  recorder: Triton's own binder for a CUDA backend (``CUDABackend`` of an
  sm_90 ``GPUTarget``, built from the kernel's signature with
  ``create_function_from_signature``, as ``JITFunction.create_binder`` does)
  gives the specialisation of the arguments (pointer dtypes and 16-byte
  alignment, int ``== 1`` / ``% 16`` unless ``do_not_specialize``,
  constexprs), and ``compute_cache_key`` the key ``run`` would look its
  compiled kernel up with; nothing is compiled or launched;
* plans every launch for an H100/H200 (``launch.device_profile`` says: a GPU
  with 132 SMs) while the tensors are CPU tensors (their addresses give the
  alignments: the CPU allocator, like CUDA's, starts allocations on 64-byte
  boundaries or more);
* calls the public entry points (``ops.*`` with ``backend="triton"``, and
  the attention launcher with ``max_seq_len``) over batch sizes 1..64 and
  65..256 sparsely, with per-step values (noise depth, sequence lengths,
  positions, seeds, ``max_seq_len``) drawn at random;
* prints one JSON object: ``records`` ``[scenario, config, B, variant,
  [[kernel, key digest], ...]]`` and ``keys`` ``{digest: key}``.

``--canary`` records a toy kernel launched with per-step ints and offsets
left specialised instead: its keys must change (the recorder sees them).
``--cuda`` (a GPU machine) launches for real and prints how many variants
of each kernel Triton compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402

SMS = 132
BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))
BATCHES = list(range(1, 65)) + [65, 77, 96, 100, 127, 128, 131, 132, 133, 150, 192, 200, 255,
                                256]
VARIANTS = 3  # per-step draws per batch size

_LAUNCHES: list = []
_KEYS: dict = {}
_BINDERS: dict = {}


def _record(self, *args, grid, warmup, **kwargs):
    binder = _BINDERS.get(id(self))
    if binder is None:
        binder = _BINDERS[id(self)] = tjit.create_function_from_signature(
            self.signature, self.params, BACKEND)
    _, specialization, options = binder(*args, **kwargs)
    if hasattr(tjit, "compute_cache_key"):
        key = tjit.compute_cache_key({}, specialization, options)
    else:  # older Triton: run() formed the key inline, from the same two parts
        key = str(specialization) + str(options)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    _KEYS[digest] = key
    _LAUNCHES.append([self.fn.__name__, digest])
    return None


def install_recorder() -> None:
    tjit.JITFunction.run = _record


def take() -> list:
    out = sorted(_LAUNCHES)
    _LAUNCHES.clear()
    return out


def canary() -> list:
    @triton.jit
    def _toy(x_ptr, n, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), n)

    install_recorder()
    buf = torch.empty(4096)
    records = []
    for B in BATCHES[:64]:
        _toy[(1,)](buf[B:], B, BLOCK=16)  # offset B floats, int B
        records.append(["canary", "toy", B, 0, take()])
    return records


def main() -> list:
    from entropix_vllm import ops, step
    from entropix_vllm.config import EntropixConfig
    from entropix_vllm.contract import K_MAX, AttnStats
    from entropix_vllm.triton_kernels import attn_stats, launch

    assert isinstance(attn_stats._head_partials_kernel, tjit.JITFunction)
    install_recorder()
    launch.device_profile = lambda device: launch.DeviceProfile(True, SMS)
    rng = random.Random(0)
    records = []
    bmax = max(BATCHES)

    # -- logit statistics (+ candidates, merge) -------------------------------
    for V in (49152, 128256):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.empty(bmax, V, dtype=dtype)
            for nc in (K_MAX, 0):
                cfg = f"V={V} {str(dtype)[6:]} K={nc}"
                for B in BATCHES:
                    ops.logit_stats_and_candidates(logits[:B], nc, backend="triton")
                    records.append(["logit_stats", cfg, B, 0, take()])

    # -- the step: statistics, then the fused decision with noise of depth N ---
    V = 49152
    logits = torch.empty(bmax, V, dtype=torch.float32)
    table_all = step.coefficient_table([EntropixConfig()] * bmax)
    cot_all = torch.full((bmax,), 17, dtype=torch.int64)
    prev_all = torch.zeros(bmax, dtype=torch.bool)
    figures = torch.zeros(4, bmax)  # the integration's [4, capacity] buffer
    for with_attn in (True, False):
        cfg = f"V={V} attn={with_attn}"
        for B in BATCHES:
            for var in range(VARIANTS):
                N = rng.randint(1, 8)
                stats, cv, ci = ops.logit_stats_and_candidates(logits[:B], K_MAX,
                                                               backend="triton")
                take()
                noise = torch.empty(B, N, K_MAX)
                attn = AttnStats(*(figures[i, :B] for i in range(4))) if with_attn else None
                ops.decide_and_sample(stats.entropy, stats.varentropy, attn, table_all[:B],
                                      cv, ci, noise, stats.argmax, cot_all[:B], prev_all[:B],
                                      logits[:B], backend="triton")
                ops.sample_candidates(cv, ci, stats.entropy, torch.ones(B, dtype=torch.int64),
                                      stats.varentropy, stats.max, torch.ones(B,
                                                                              dtype=torch.int64),
                                      noise, backend="triton")
                records.append(["step", cfg, B, var, take()])

    # -- attention figures -----------------------------------------------------
    for H, HKV, D, dtype in ((9, 3, 64, torch.bfloat16), (32, 8, 128, torch.bfloat16),
                             (8, 2, 64, torch.float32)):
        BS, width = 16, 256  # block size; block table columns (4096 keys)
        nb = 512
        cache = torch.empty(nb, HKV, BS, 2 * D, dtype=dtype)
        keys = cache.transpose(1, 2).split(D, -1)[0]  # vLLM's view
        q_all = torch.empty(bmax, H, D, dtype=dtype)
        bt_all = torch.zeros(bmax, width, dtype=torch.int32)
        sl_all = torch.zeros(bmax, dtype=torch.int32)
        out = torch.zeros(4, bmax)
        ws = ops.attention_workspace(bmax, H, HKV, torch.device("cpu"), backend="triton")
        cfg = f"H={H} HKV={HKV} D={D} {str(dtype)[6:]}"
        for B in BATCHES:
            for var in range(VARIANTS):
                sl_all[:B] = torch.tensor([rng.randint(0, width * BS) for _ in range(B)])
                args = (q_all[:B], keys, bt_all[:B], sl_all[:B], D ** -0.5)
                ops.paged_attention_stats(*args, backend="triton", out=out, workspace=ws)
                records.append(["attn_stats", cfg + " out+workspace", B, var, take()])
                ops.paged_attention_stats(*args, backend="triton")
                records.append(["attn_stats", cfg + " allocating", B, var, take()])
                attn_stats.paged_attention_stats(*args,
                                                 max_seq_len=rng.randint(1, width * BS))
                records.append(["attn_stats", cfg + " max_seq_len", B, var, take()])
    return records


def cuda_counts() -> dict:
    """On a GPU: the public launchers run for real over B = 1..64 and 65..256
    sparsely (one configuration per kernel, random per-step values); returns
    how many compiled variants each kernel holds afterwards (Triton's own
    in-memory kernel cache, this process only)."""
    from entropix_vllm import ops, step
    from entropix_vllm.config import EntropixConfig
    from entropix_vllm.contract import K_MAX, AttnStats
    from entropix_vllm.triton_kernels import (attn_stats, candidate_sampling, entropix_decide,
                                              logit_stats)

    dev = torch.device("cuda")
    rng = random.Random(0)
    g = torch.Generator(device=dev).manual_seed(0)
    bmax, V = max(BATCHES), 49152
    logits = torch.randn(bmax, V, device=dev, generator=g) * 3
    table = step.coefficient_table([EntropixConfig()] * bmax, dev)
    cot = torch.full((bmax,), 17, dtype=torch.int64, device=dev)
    prev = torch.zeros(bmax, dtype=torch.bool, device=dev)
    H, HKV, D, BS, width = 9, 3, 64, 16, 64
    nb = bmax * width
    keys = torch.randn(nb, HKV, BS, 2 * D, device=dev, dtype=torch.bfloat16,
                       generator=g).transpose(1, 2).split(D, -1)[0]
    q = torch.randn(bmax, H, D, device=dev, generator=g).to(torch.bfloat16)
    bt = torch.randperm(nb, device=dev, generator=g).view(bmax, width).to(torch.int32)
    sl = torch.zeros(bmax, dtype=torch.int32, device=dev)
    figures = torch.zeros(4, bmax, device=dev)
    ws = ops.attention_workspace(bmax, H, HKV, dev)
    for B in BATCHES:
        for _ in range(VARIANTS):
            N = rng.randint(1, 8)
            sl[:B] = torch.randint(0, width * BS + 1, (B,), device=dev, generator=g)
            st = ops.paged_attention_stats(q[:B], keys, bt[:B], sl[:B], D ** -0.5,
                                           out=figures, workspace=ws)
            stats, cv, ci = ops.logit_stats_and_candidates(logits[:B])
            noise = torch.empty(B, N, K_MAX, device=dev).exponential_(generator=g)
            ops.decide_and_sample(stats.entropy, stats.varentropy, st, table[:B], cv, ci, noise,
                                  stats.argmax, cot[:B], prev[:B], logits[:B])
            ones = torch.ones(B, dtype=torch.int64, device=dev)
            ops.sample_candidates(cv, ci, torch.ones(B, device=dev), ones * 20,
                                  torch.full((B,), 0.9, device=dev), torch.zeros(B, device=dev),
                                  ones, noise)
    torch.cuda.synchronize()
    fns = [logit_stats._logit_stats_kernel, logit_stats._merge_kernel,
           logit_stats._candidates_kernel, entropix_decide._decide_kernel,
           candidate_sampling._sample_kernel,
           attn_stats._head_partials_kernel, attn_stats._agreement_kernel]
    return {f.fn.__name__: sum(len(c[0]) for c in f.device_caches.values()) for f in fns}


if __name__ == "__main__":
    if "--cuda" in sys.argv:
        json.dump({"counts": cuda_counts()}, sys.stdout)
        sys.exit(0)
    recs = canary() if "--canary" in sys.argv else main()
    json.dump({"records": recs, "keys": _KEYS}, sys.stdout)
