"""Counter-based Exp(1) noise keyed by (seed, position), one Triton kernel.

The Entropix step (``entropix_vllm.step.entropix_step``) races each row's
candidates with Exp(1) noise ``[B, N, K]``. vLLM's Model Runner V2 samples
with noise derived from each request's seed and the position being sampled
(``v1/worker/gpu/sample/gumbel.py``: a murmur3 hash of (seed, position, token
id)), so a seeded request gives the same tokens whatever else is in the batch,
with no generator state to carry between steps. This module gives the Entropix
sampler the same property:

    noise[b, j, c] = E(seeds[b], positions[b], j * 65536 + c)

where ``E`` depends on nothing else: not on ``B``, ``N``, ``K``, the row's
place in the batch or the other rows. Shapes and dtypes:

* ``seeds``:     ``[B]`` integer tensor (int64 in vLLM; any int64 value,
  negative ones included);
* ``positions``: ``[B]`` integer tensor, the position of the token being
  sampled (``0 <= position < 2**31`` in practice; all 64 bits are hashed);
* result:        ``[B, num_draws, num_candidates]`` float32, contiguous, on
  the inputs' device; ``num_candidates <= 65536``.

Construction of ``E``:

1. ``h = murmur3_32`` over five 32-bit words (seed low, seed high, position
   low, position high, offset ``j * 65536 + c``) with the initial state
   ``DOMAIN`` (vLLM's Gumbel noise hashes four words from state 0 or
   ``0x9E3779B9``, so the streams differ);
2. ``u = (h + 0.5) / 2**32`` in ``(0, 1)``, formed as ``hi16 * 2**-16 +
   (lo16 + 0.5) * 2**-32`` so that small ``u`` keep all 32 bits, and its
   complement ``w = 1 - u`` from the complemented bits, exactly, so
   ``w > 0`` keeps all 32 bits too;
3. ``E = -log1p(-u)``: a degree-8 series for ``u < 1/8`` (relative error
   below ``1e-8``: the small values that win an exponential race keep their
   precision) and ``-log(w)`` otherwise. ``E`` is finite and positive; its
   largest value is about 22.9.

This module is the Triton backend of ``entropix_vllm.ops.seeded_exponential_noise``
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); the torch backend,
the same integer hash and float formula with torch ops, is
``entropix_vllm.torch_ops.seeded_exponential_noise``. The constants (``DOMAIN``
and the others) are ``entropix_vllm.contract``'s ``NOISE_*``. The hash bits are
identical on both backends; the float result agrees to a few ulp (``log``
implementations differ). ``ops`` checks the arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entropix_vllm import contract

#: Initial murmur3 state of this noise stream.
DOMAIN = contract.NOISE_DOMAIN
#: Offset stride between draws: ``offset = draw * OFFSET_STRIDE + candidate``.
OFFSET_STRIDE = contract.NOISE_OFFSET_STRIDE
#: Below this uniform value ``E`` comes from the series.
SERIES_BELOW = contract.NOISE_SERIES_BELOW


@triton.jit
def _rotl32(v, s: tl.constexpr):
    return (v << s) | (v >> (32 - s))


@triton.jit
def _mix(h, k):
    k = k * 0xCC9E2D51
    k = _rotl32(k, 15)
    k = k * 0x1B873593
    h = h ^ k
    h = _rotl32(h, 13)
    return h * 5 + 0xE6546B64


@triton.jit
def _fmix(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["n_total", "s_out_b"],
            do_not_specialize_on_alignment=["seed_ptr", "pos_ptr"])
def _exp_noise_kernel(out_ptr, seed_ptr, pos_ptr, n_total, num_candidates,
                      s_out_b, s_out_n,
                      DOMAIN_: tl.constexpr, STRIDE: tl.constexpr,
                      SERIES_BELOW_: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_total
    j = idx // num_candidates
    c = idx % num_candidates

    seed = tl.load(seed_ptr + row).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    # Row prefix, scalar: state after the seed and position words.
    h = (seed ^ seed).to(tl.uint32) + DOMAIN_
    h = _mix(h, (seed & 0xFFFFFFFF).to(tl.uint32))
    h = _mix(h, ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _mix(h, (pos & 0xFFFFFFFF).to(tl.uint32))
    h = _mix(h, ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32))
    offset = (j * STRIDE + c).to(tl.uint32)
    h = _mix(h, offset)
    h = _fmix(h ^ 20)

    hi = (h >> 16).to(tl.int32).to(tl.float32)
    lo = (h & 0xFFFF).to(tl.int32).to(tl.float32)
    u = hi * 1.52587890625e-05 + (lo + 0.5) * 2.3283064365386963e-10
    w = (65535.0 - hi) * 1.52587890625e-05 + ((65535.0 - lo) + 0.5) * 2.3283064365386963e-10
    # -log1p(-u) = u * (1 + u/2 + u^2/3 + ... + u^7/8)
    poly = 0.125
    poly = 0.14285714285714285 + u * poly
    poly = 0.16666666666666666 + u * poly
    poly = 0.2 + u * poly
    poly = 0.25 + u * poly
    poly = 0.3333333333333333 + u * poly
    poly = 0.5 + u * poly
    poly = 1.0 + u * poly
    series = u * poly
    direct = -tl.log(w)
    e = tl.where(u < SERIES_BELOW_, series, direct)
    tl.store(out_ptr + row.to(tl.int64) * s_out_b + j * s_out_n + c, e, mask=mask)


def seeded_exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, num_draws: int,
                             num_candidates: int) -> torch.Tensor:
    """The kernel: ``[B, num_draws, num_candidates]`` float32 Exp(1) noise."""
    B = seeds.shape[0]
    out = torch.empty(B, num_draws, num_candidates, dtype=torch.float32, device=seeds.device)
    n_total = num_draws * num_candidates
    if B == 0 or n_total == 0:
        return out
    # The tile (up to 8 draws of K) follows the candidates only: the number of
    # draws changes per step (and with it n_total and the row stride, passed
    # unspecialised), K does not.
    BLOCK = min(1024, max(16, 8 * triton.next_power_of_2(num_candidates)))
    grid = (B, triton.cdiv(n_total, BLOCK))
    _exp_noise_kernel[grid](out, seeds.contiguous(), positions.contiguous(), n_total,
                            num_candidates, out.stride(0), out.stride(1),
                            DOMAIN_=DOMAIN, STRIDE=OFFSET_STRIDE, SERIES_BELOW_=SERIES_BELOW,
                            BLOCK=BLOCK)
    return out
