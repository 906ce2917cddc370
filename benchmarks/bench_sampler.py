"""Benchmark: one sampling step, vLLM's stock sampler against the Entropix step.

Question answered: what does the sampler itself cost per decode step, with the
model's forward pass left out? For each batch x vocab, on the same float32
logits (Gaussian, std 3), it times

* ``stock``: vLLM's own ``vllm.v1.sample.sampler.Sampler.sample`` with every
  row random at the given ``--temperature`` (and ``--top-k`` / ``--top-p`` when
  given), no logprobs: what ``vllm bench throughput`` rows cost vLLM's sampler;
* ``entropix``: what ``EntropixSamplerV1`` adds per step on the same rows: the
  Exp(1) noise ``[B, n_adaptive, 128]`` and
  ``entropix_vllm.step.entropix_step`` (one read of the logits for the
  statistics and the top-128 candidates, the branch parameters, the draws)
  with the default settings and attention figures from ``--attn`` (the
  capture and the attention statistics run in the forward pass and are not
  part of this number).

Timings are medians over at least ``--min-time`` seconds (CPU: wall clock with
``torch.get_num_threads()`` threads; CUDA: synchronised wall clock). Needs
vLLM installed (the stock sampler is vLLM's).

    python -P benchmarks/bench_sampler.py                  # CPU, the bundled model's vocabulary
    python -P benchmarks/bench_sampler.py --batches 1,64,256 --vocabs 128256 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch


def parse_list(s: str):
    return [int(t) for t in s.split(",") if t]


def timed(fn, device, min_time: float, min_iters: int = 5) -> float:
    """Median seconds of ``fn()``."""
    fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_iters or time.perf_counter() - start < min_time:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def stock_metadata(B: int, args, device):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    full = lambda v, dt: torch.full((B,), v, dtype=dt, device=device)  # noqa: E731
    return SamplingMetadata(
        temperature=full(args.temperature, torch.float32), all_greedy=False,
        all_random=True,
        top_p=full(args.top_p, torch.float32) if args.top_p < 1.0 else None,
        top_k=full(args.top_k, torch.int32) if args.top_k > 0 else None,
        generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=full(0.0, torch.float32),
        presence_penalties=full(0.0, torch.float32),
        repetition_penalties=full(1.0, torch.float32), output_token_ids=[[] for _ in range(B)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=parse_list, default=[1, 8, 48, 128])
    ap.add_argument("--vocabs", type=parse_list, default=[49152, 128256])
    ap.add_argument("--temperature", type=float, default=1.0, help="stock rows")
    ap.add_argument("--top-k", type=int, default=0, help="stock rows (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="stock rows (1: off)")
    ap.add_argument("--attn", choices=("zeros", "fixed"), default="fixed",
                    help="attention figures fed to the step (zeros: none captured; fixed: "
                         "entropy 2, varentropy 0.5, agreement 0.002, interaction 3)")
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args(argv)

    import vllm
    from vllm.v1.sample.sampler import Sampler

    from entropix_vllm import ops, step
    from entropix_vllm.config import EntropixConfig
    from entropix_vllm.contract import K_MAX
    from entropix_vllm.reference import AttnStats

    device = torch.device(args.device)
    cfg = EntropixConfig()
    sampler = Sampler()
    print(f"## Sampler step benchmark ({datetime.date.today().isoformat()})\n")
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads")
    print(f"- device: {dev_name}; vLLM {vllm.__version__}; torch {torch.__version__}; "
          f"Entropix backends: {ops.describe(torch.device(device).type)}")
    print(f"- stock rows: temperature {args.temperature}, top_k {args.top_k or 'off'}, "
          f"top_p {args.top_p if args.top_p < 1 else 'off'}; Entropix: default settings, "
          f"{cfg.n_adaptive_samples} draws of noise, attention figures: {args.attn}; "
          f"medians (ms)\n")
    rows = []
    for B in args.batches:
        for V in args.vocabs:
            g = torch.Generator().manual_seed(B * 31 + V)
            logits = (torch.randn(B, V, generator=g) * 3.0).to(device)
            md = stock_metadata(B, args, device)
            table = step.coefficient_table([cfg] * B, device)
            cot = torch.full((B,), 4563 % V, dtype=torch.int64, device=device)
            prev = torch.zeros(B, dtype=torch.bool, device=device)
            if args.attn == "zeros":
                attn = None
            else:  # fixed mid-range figures
                attn = AttnStats(*(torch.full((B,), v, device=device)
                                   for v in (2.0, 0.5, 0.002, 3.0)))

            def stock():
                return sampler.sample(logits.clone(), md)

            def entropix():
                noise = torch.empty(B, cfg.n_adaptive_samples, K_MAX,
                                    device=device).exponential_()
                return step.entropix_step(logits, attn, table, cot, prev, noise).tokens

            t_clone = timed(lambda: logits.clone(), device, args.min_time / 4)
            t_s = timed(stock, device, args.min_time) - t_clone
            t_e = timed(entropix, device, args.min_time)
            rows.append((B, V, f"{t_s * 1e3:.3f}", f"{t_e * 1e3:.3f}", f"{t_s / t_e:.2f}"))
            print(f"({B}x{V} done)", file=sys.stderr, flush=True)
    print("| batch | vocab | stock vLLM sampler (ms) | Entropix step (ms) | stock / Entropix |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print("\n(stock: the time of the logits clone that protects the shared input "
          "from vLLM's in-place ops is subtracted)")


if __name__ == "__main__":
    main()
