"""Benchmark: per-row logit statistics + top-K candidates, one read of the logits.

Question answered: how fast is ``ops.logit_stats_and_candidates`` (max, argmax,
logsumexp, entropy, varentropy and the top-128 candidates of every row) next to
the memory system and next to the plain torch way of computing the same things?

CUDA (``--device cuda``): for each batch x vocab (x dtype), times

* the fused Triton kernel (``triton_kernels.logit_stats.fused_logit_stats``,
  with candidates; and without them, "stats only"), its achieved bandwidth (bytes of logits read / time) and
  that bandwidth as a fraction of a device-to-device copy's bandwidth measured
  in the same run (``y.copy_(x)`` of the same tensor, 2 x bytes / time);
  the default candidate method (block maxima) and the other one
  (``candidates="stream"``) side by side;
* "fused, graph": the same launch replayed from a CUDA graph
  (``do_bench_cudagraph``): small batches are otherwise dominated by the
  host's launch overhead, which vLLM's CUDA graphs remove;
* "x ideal": the kernel's time over the time to read the logits once at the
  copy's bandwidth (batch 1 is launch/latency bound: expect well above 1);
* the torch path (max/argmax, log_softmax, exp, two weighted sums,
  logsumexp, topk) and ``torch.compile`` of it, and the speed-ups over both.

Timings are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed
between runs). ``--sweep`` first times a few launch configurations on a few
shapes (tuning aid).

CPU (``--device cpu``): the C++ op (``torch.ops.entropix`` through
``entropix_vllm.ops``, backend "cpp", when built) against the torch path, with
``torch.get_num_threads()`` threads; ``--quick`` uses a small shape list so the
run takes a few minutes on a 2-core machine.

Prints markdown tables (device, versions, date) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # installed (scripts/setup.sh); a bare checkout takes it from the root
    import entropix_vllm  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

LN2 = math.log(2.0)
K = 128


def torch_path(x: torch.Tensor, k: int = K):
    """The same statistics with plain torch ops (the usual way to write them)."""
    xf = x.float()
    mx, am = xf.max(-1)
    logp = torch.log_softmax(xf, -1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    h = -plogp.sum(-1)
    dev = torch.where(p > 0, logp + h[:, None], torch.zeros_like(p))
    v = (p * dev * dev).sum(-1)
    lse = torch.logsumexp(xf, -1)
    vals, ids = torch.topk(xf, k, -1)
    return mx, am, lse, h / LN2, v / (LN2 * LN2), vals, ids


def parse_list(s: str):
    return [int(t) for t in s.split(",") if t]


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
def cuda_main(args):
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from entropix_vllm import reference
    from entropix_vllm.triton_kernels.logit_stats import fused_logit_stats, plan

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"## Logit statistics benchmark ({props.name})\n")
    print(f"- date: {datetime.date.today().isoformat()}; device: {props.name}, "
          f"{props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"triton {triton.__version__}; CUDA {torch.version.cuda}")
    print(f"- fused kernel with top-{K} candidates; times are do_bench medians (ms), "
          f"L2 flushed between runs\n", flush=True)

    def bench(fn):
        return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    compiled = None
    if not args.no_compile:
        compiled = torch.compile(torch_path, dynamic=True)

    def make(B, V, dtype):
        g = torch.Generator(device=dev).manual_seed(B * 7 + V)
        return (torch.randn(B, V, device=dev, generator=g) * 3.0).to(dtype)

    # sanity check against the float64 reference on one shape
    x = make(4, 128256, torch.float32)
    st, cv, _ = fused_logit_stats(x, K)
    ref = reference.logit_stats(x.cpu())
    err_h = (st.entropy.double().cpu() - ref.entropy).abs().max().item()
    rv, _ = reference.topk_candidates(x.cpu(), K)
    print(f"- sanity (4 x 128256): max |entropy error| = {err_h:.2e} bits, candidates "
          f"equal: {torch.equal(cv.cpu(), rv)}\n", flush=True)

    if args.sweep:
        rows = []
        shapes = [(1, 128256), (8, 128256), (64, 128256), (256, 128256), (1024, 32000)]
        configs = [dict(layout="row", block=b, num_warps=w, prefetch=pf, candidates=c)
                   for c in ("blockmax", "stream")
                   for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8))
                   for pf in (False, True)]
        configs += [dict(layout="split", block=b, num_warps=w, candidates=c)
                    for c in ("blockmax", "stream")
                    for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
        for B, V in shapes:
            x = make(B, V, torch.float32)
            y = torch.empty_like(x)
            t_copy = bench(lambda: y.copy_(x))
            nbytes = x.numel() * x.element_size()
            for cfg in configs:
                if (cfg["layout"] == "row" and B < 64) or (cfg.get("num_splits") and B > 8):
                    continue
                try:
                    t = bench(lambda: fused_logit_stats(x, K, **cfg))
                except Exception as e:  # a config that does not compile/fit
                    rows.append((B, V, cfg, "error: " + type(e).__name__, "", ""))
                    continue
                p = plan(B, V, K, dev, cfg["layout"], cfg.get("num_splits"), cfg["block"],
                         cfg["num_warps"], cfg.get("prefetch", False), cfg["candidates"])
                rows.append((B, V, f"{cfg['candidates']} {cfg['layout']} blk={cfg['block']} "
                             f"w={cfg['num_warps']} NS={p['NS']} "
                             f"pf={int(cfg.get('prefetch', False))}", f"{t * 1e3:.1f}",
                             f"{nbytes / t / 1e6:.0f}",
                             f"{(nbytes / t) / (2 * nbytes / t_copy):.2f}"))
            print(f"(sweep {B}x{V} done)", file=sys.stderr, flush=True)
        print("### Launch configuration sweep (fp32)\n")
        print(md_table(["B", "V", "config", "time (us)", "GB/s", "of copy bw"], rows))
        print(flush=True)

    rows = []
    for dtype in args.dtypes:
        for B in args.batches:
            for V in args.vocabs:
                x = make(B, V, dtype)
                y = torch.empty_like(x)
                nbytes = x.numel() * x.element_size()
                t_copy = bench(lambda: y.copy_(x))
                t_fused = bench(lambda: fused_logit_stats(x, K))
                t_stream = bench(lambda: fused_logit_stats(x, K, candidates="stream"))
                t_stats = bench(lambda: fused_logit_stats(x, 0))
                try:  # replayed from a CUDA graph: no host launch overhead
                    t_graph = do_bench_cudagraph(lambda: fused_logit_stats(x, K), rep=args.rep,
                                                 return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print(f"graph timing failed at {B}x{V}: {e}", file=sys.stderr)
                    t_graph = float("nan")
                try:
                    t_torch = bench(lambda: torch_path(x))
                except torch.OutOfMemoryError:
                    t_torch = float("nan")
                t_comp = float("nan")
                if compiled is not None:
                    try:
                        compiled(x)
                        t_comp = bench(lambda: compiled(x))
                    except Exception as e:  # noqa: BLE001
                        print(f"torch.compile failed at {B}x{V}: {e}", file=sys.stderr)
                copy_bw = 2 * nbytes / t_copy  # bytes per ms
                fused_bw = nbytes / t_fused
                p = plan(B, V, K, dev)
                rows.append((
                    str(dtype).replace("torch.", ""), B, V,
                    "row" if p["NS"] == 1 else f"split {p['NS']}",
                    f"{t_stats * 1e3:.1f}", f"{t_fused * 1e3:.1f}", f"{t_graph * 1e3:.1f}",
                    f"{fused_bw / 1e6:.0f}", f"{copy_bw / 1e6:.0f}",
                    f"{fused_bw / copy_bw:.2f}", f"{t_fused / (nbytes / copy_bw):.1f}",
                    f"{t_stream * 1e3:.1f}", f"{(nbytes / t_stream) / copy_bw:.2f}",
                    f"{t_torch * 1e3:.1f}", f"{t_torch / t_fused:.1f}",
                    f"{t_comp * 1e3:.1f}" if t_comp == t_comp else "n/a",
                    f"{t_comp / t_fused:.1f}" if t_comp == t_comp else "n/a"))
                del x, y
                print(f"({dtype} {B}x{V} done)", file=sys.stderr, flush=True)
    print("### Fused kernel vs copy bandwidth and the torch path\n")
    print(md_table(["dtype", "B", "V", "layout", "stats only (us)", "fused (us)",
                    "fused, graph (us)", "fused GB/s", "copy GB/s",
                    "of copy bw", "x ideal", "fused, stream method (us)",
                    "stream: of copy bw", "torch (us)", "speed-up", "compiled (us)",
                    "speed-up vs compiled"], rows))


# ----------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------
def cpu_time(fn, min_time: float, min_iters: int = 3) -> float:
    """Median seconds of ``fn()`` over at least ``min_iters`` calls / ``min_time`` s."""
    fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cpu_main(args):
    from entropix_vllm import ops

    threads = torch.get_num_threads()
    print(f"## Logit statistics benchmark (CPU)\n")
    print(f"- date: {datetime.date.today().isoformat()}; CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {threads}; torch {torch.__version__}")
    have_cpp = ops.cpp_available()
    print(f"- C++ op built: {have_cpp}; top-{K} candidates; medians of wall-clock times\n")
    rows = []
    for dtype in args.dtypes:
        for B in args.batches:
            for V in args.vocabs:
                g = torch.Generator().manual_seed(B + V)
                x = (torch.randn(B, V, generator=g) * 3.0).to(dtype)
                nbytes = x.numel() * x.element_size()
                t_torch = cpu_time(lambda: torch_path(x), args.min_time)
                if have_cpp:
                    t_cpp = cpu_time(lambda: ops.logit_stats_and_candidates(x, K, backend="cpp"),
                                     args.min_time)
                    c = (f"{t_cpp * 1e3:.2f}", f"{nbytes / t_cpp / 1e9:.1f}",
                         f"{t_torch / t_cpp:.1f}")
                else:
                    c = ("not built", "", "")
                rows.append((str(dtype).replace("torch.", ""), B, V, c[0], c[1],
                             f"{t_torch * 1e3:.2f}", c[2]))
                print(f"({dtype} {B}x{V} done)", file=sys.stderr, flush=True)
    print(md_table(["dtype", "B", "V", "C++ (ms)", "C++ GB/s", "torch (ms)", "speed-up"], rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=parse_list, default=None)
    ap.add_argument("--vocabs", type=parse_list, default=None)
    ap.add_argument("--dtypes", default="float32",
                    help="comma list of logits dtypes: float32,bfloat16,float16")
    ap.add_argument("--quick", action="store_true", help="small shape list (CPU: a few minutes)")
    ap.add_argument("--sweep", action="store_true", help="CUDA: time launch configurations first")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warm-up (ms)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time (ms)")
    ap.add_argument("--min-time", type=float, default=0.5, help="CPU: seconds per timing")
    args = ap.parse_args(argv)
    if args.batches is None:
        args.batches = [1, 8, 64] if args.quick else [1, 8, 64, 256, 1024]
    if args.vocabs is None:
        args.vocabs = [32000, 128256] if args.quick else [32000, 128256, 151936, 256000]
    args.dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device")
        cuda_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
