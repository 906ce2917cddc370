"""How much does the attention-statistics pass cost, next to reading the keys?

For a Llama-3-8B-like layer (H=32 query heads, H_kv=8, head size 128, block
size 16, bf16 KV cache in vLLM's FlashAttention layout: one
``[num_blocks, H_kv, block_size, 2*D]`` tensor per layer, K taken as the strided
view ``transpose(1, 2).split(D, -1)[0]``, blocks shuffled), and every
combination of batch {1, 64, 256} x context {512, 4096, 32768}, this prints a
markdown table with:

* ``read K once``: the time of a plain Triton kernel that reads that layer's
  keys of those sequences once through the block table (and sums them), the
  floor for anything that looks at every key; with the bandwidth it reached;
* ``stats``: ``triton_kernels.attn_stats.paged_attention_stats`` (both passes,
  the allocations, every launch), and the ratio of the two.

Times are medians of ``triton.testing.do_bench`` (the L2 cache is flushed
before every run, launch overhead included). ``--graph`` adds GPU-only times
measured from CUDA graphs (each run preceded by an L2 flush inside the graph,
the flush's own time subtracted; the statistics captured as an engine would,
with ``out=`` and a workspace made once: nothing allocated inside the graph). One decode step of a whole model is not
measured on CUDA (that needs vLLM on the GPU machine): the column says so.

``--device cpu`` times, on small shapes, the ``cpp`` backend of
``entropix_vllm.ops`` (when built) and the torch reference against a torch
gather-and-sum read of the same keys (``--interpret`` adds the Triton kernels
under the interpreter, which is very slow). ``--decode-step [MODEL]`` (CPU)
takes the layer shape from MODEL (default: the bundled model) and adds one
decode step of it in vLLM, with the stock sampler and with Entropix.

    python benchmarks/bench_attn_stats.py                    # CUDA, full grid
    python benchmarks/bench_attn_stats.py --sweep            # + launch-parameter variants
    python benchmarks/bench_attn_stats.py --device cpu
    python benchmarks/bench_attn_stats.py --device cpu --decode-step   # + the bundled model's step
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # installed (scripts/setup.sh); a bare checkout takes it from the root
    import entropix_vllm  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batches", default=None, help="comma list (default 1,64,256; cpu 1,4)")
    ap.add_argument("--contexts", default=None,
                    help="comma list (default 512,4096,32768; cpu 128,512)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep time (ms)")
    ap.add_argument("--graph", action="store_true", help="also GPU-only times from CUDA graphs")
    ap.add_argument("--sweep", action="store_true",
                    help="also time launch-parameter variants and each pass alone")
    ap.add_argument("--no-max-seq-len", action="store_true",
                    help="do not pass max_seq_len (grid from the block table's width)")
    ap.add_argument("--interpret", action="store_true", help="cpu: also the Triton interpreter")
    ap.add_argument("--threads", type=int, default=1,
                    help="cpu: torch threads (default 1: stable timings on a shared machine)")
    ap.add_argument("--decode-step", nargs="?", const="bundled", default=None, metavar="MODEL",
                    help="cpu: also time one decode step of MODEL (default: the bundled model) "
                         "in vLLM at each batch and context, with the stock sampler and with "
                         "--sampler entropix; the layer shape then comes from the model's "
                         "config and the block size is vLLM CPU's 128")
    ap.add_argument("--decode-tokens", type=int, default=32,
                    help="decode steps timed per measurement (--decode-step)")
    ap.add_argument("--decode-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


ARGS = parse_args()
if ARGS.device == "cpu" and ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
except ImportError:  # cpu mode works without triton
    triton = None

from entropix_vllm import ops  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Launch-parameter variants timed by --sweep (keyword arguments of
# paged_attention_stats).
VARIANTS = {
    "default": {},
    "bn1=64,w1=4": dict(block_n1=64, num_warps1=4),
    "bn2=16,w2=4": dict(block_n2=16, num_warps2=4),
    "bn2=16,w2=8": dict(block_n2=16, num_warps2=8),
}


# ----------------------------------------------------------------------------
# The baseline: read the keys once
# ----------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _read_keys_kernel(k_ptr, bt_ptr, len_ptr, out_ptr, NS, KPS,
                          sk_n, sk_p, sk_h, sk_d, sbt_b, sbt_n,
                          HKV: tl.constexpr, HKV_PAD: tl.constexpr, BS: tl.constexpr,
                          BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        sid = tl.program_id(0)
        b = tl.program_id(1)
        L = tl.load(len_ptr + b).to(tl.int32)
        start = sid * KPS
        end = tl.minimum(start + KPS, L)
        r = tl.arange(0, HKV_PAD * BLOCK_N)
        r_g = r // BLOCK_N
        r_j = r % BLOCK_N
        d = tl.arange(0, D_PAD)
        acc = tl.zeros([HKV_PAD * BLOCK_N, D_PAD], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * sbt_b
        for n0 in range(start, end, BLOCK_N):
            n = n0 + r_j
            ok = (n < end) & (r_g < HKV)
            blk = tl.load(bt_row + (n // BS) * sbt_n, mask=ok, other=0).to(tl.int64)
            off = blk * sk_n + (n % BS).to(tl.int64) * sk_p + r_g.to(tl.int64) * sk_h
            kv = tl.load(k_ptr + off[:, None] + d[None, :] * sk_d,
                         mask=ok[:, None] & (d < D)[None, :], other=0.0)
            acc += kv.to(tl.float32)
        tl.store(out_ptr + b * NS + sid, tl.sum(tl.sum(acc, axis=1), axis=0))


def read_keys_once(k, bt, sl, max_len, block_n, num_warps, programs):
    B = bt.shape[0]
    HKV, D, BS = k.shape[2], k.shape[3], k.shape[1]
    kps = max(block_n, -(-max_len // max(1, programs // B)))
    kps = -(-kps // block_n) * block_n
    ns = -(-max_len // kps)
    out = torch.empty((B, ns), dtype=torch.float32, device=k.device)
    _read_keys_kernel[(ns, B)](
        k, bt, sl, out, ns, kps, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        bt.stride(0), bt.stride(1), HKV=HKV, HKV_PAD=triton.next_power_of_2(HKV), BS=BS,
        BLOCK_N=block_n, D=D, D_PAD=triton.next_power_of_2(D), num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
def bench_cuda(fn, rep):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, n=20, trials=5):
    """GPU time per call from CUDA graphs: n x (flush L2, fn) minus n x flush."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")

    def capture(with_fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up allocations on the side stream
                flush.zero_()
                if with_fn:
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    def timed(g):
        ts = []
        for _ in range(trials):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    g1, g0 = capture(True), capture(False)
    timed(g1), timed(g0)
    return max(0.0, (timed(g1) - timed(g0)) / n)


def bench_cpu(fn, min_time=0.5, max_reps=50):
    fn()
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < max_reps and (len(ts) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3  # best of n: the CPU machine may be shared


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------
def make_inputs(B, L, H, HKV, D, BS, dtype, device, seed=0):
    """q [B,H,D], K view of a vLLM-layout cache, shuffled block table, seq lens."""
    nblk = -(-L // BS)
    nb = B * nblk + 1
    g = torch.Generator(device=device).manual_seed(seed)
    cache = torch.empty((nb, HKV, BS, 2 * D), dtype=dtype, device=device)
    cache.normal_(generator=g)
    k = cache.transpose(1, 2).split(D, -1)[0]
    bt = torch.randperm(nb, generator=g, device=device)[: B * nblk].view(B, nblk)
    bt = bt.to(torch.int32)
    sl = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn((B, H, D), generator=g, device=device).to(dtype)
    return q, k, bt, sl, cache


def versions():
    parts = [f"torch {torch.__version__}"]
    if triton is not None:
        parts.append(f"triton {triton.__version__}")
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def fmt(x, nd=3):
    return "not measured" if x is None else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
def run_cuda(args):
    from entropix_vllm.triton_kernels import attn_stats as tk

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    batches = [int(x) for x in (args.batches or "1,64,256").split(",")]
    contexts = [int(x) for x in (args.contexts or "512,4096,32768").split(",")]
    H, HKV, D, BS = args.heads, args.kv_heads, args.head_size, args.block_size
    dtype = DTYPES[args.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    scale = D ** -0.5
    print(f"# Attention statistics benchmark ({datetime.date.today().isoformat()})\n")
    print(f"- device: {props.name} ({props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB, L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB)")
    print(f"- versions: {versions()}")
    print(f"- layer: H={H}, H_kv={HKV}, D={D}, block size {BS}, {args.dtype} cache in vLLM's "
          f"[num_blocks, H_kv, block_size, 2*D] layout (K and V allocated), shuffled blocks, "
          f"all sequences of the full context")
    print(f"- timing: triton.testing.do_bench median, L2 flushed before each run, launches "
          f"included{'; graph: GPU-only time from CUDA graphs (stats with out= and a workspace)' if args.graph else ''}")
    print(f"- stats called with max_seq_len={'no' if args.no_max_seq_len else 'yes'}\n")
    cols = ["batch", "context", "K read (GiB)", "read K once (ms)", "read GB/s", "stats (ms)",
            "stats / read"]
    if args.graph:
        cols += ["graph: read (ms)", "graph: stats (ms)", "graph: stats / read"]
    cols.append("one decode step")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(lines[0])
    print(lines[1])
    sweep_lines = []
    for B in batches:
        for L in contexts:
            k_bytes = B * L * HKV * D * esize
            need = 2 * k_bytes + 1.5 * 2**30
            free, _ = torch.cuda.mem_get_info()
            if need > free:
                row = [str(B), str(L), f"{k_bytes / 2**30:.3f}",
                       f"skipped: the cache ({2 * k_bytes / 2**30:.1f} GiB with V) does not fit "
                       f"({free / 2**30:.1f} GiB free)"] + [""] * (len(cols) - 4)
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
                continue
            q, k, bt, sl, cache = make_inputs(B, L, H, HKV, D, BS, dtype, dev)
            mx = None if args.no_max_seq_len else L
            programs = 8 * props.multi_processor_count
            best_read, best_cfg = None, None
            for bn, nw in ((8, 4), (16, 4), (16, 8), (32, 8)):
                t = bench_cuda(lambda: read_keys_once(k, bt, sl, L, bn, nw, programs), args.rep)
                if best_read is None or t < best_read:
                    best_read, best_cfg = t, (bn, nw)

            def stats(**kw):
                return lambda: tk.paged_attention_stats(q, k, bt, sl, scale, max_seq_len=mx,
                                                        **kw)

            ts = bench_cuda(stats(), args.rep)
            gbs = k_bytes / (best_read * 1e-3) / 1e9
            row = [str(B), str(L), f"{k_bytes / 2**30:.3f}", f"{best_read:.4f}", f"{gbs:.0f}",
                   f"{ts:.4f}", f"{ts / best_read:.2f}"]
            if args.graph:
                bn, nw = best_cfg
                gr = bench_graph(lambda: read_keys_once(k, bt, sl, L, bn, nw, programs))
                # as an engine captures it: figures into a fixed buffer, scratch
                # from a workspace made once (no allocation inside the graph)
                ws = tk.make_workspace(B, H, HKV, dev)
                fig = torch.empty(4, B, dtype=torch.float32, device=dev)
                gs = bench_graph(stats(out=fig, workspace=ws))
                row += [f"{gr:.4f}", f"{gs:.4f}", f"{gs / gr:.2f}" if gr > 0 else "n/a"]
            row.append("not measured")
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
            if args.sweep:
                p1 = bench_cuda(lambda: tk.head_stats(q, k, bt, sl, scale, max_seq_len=mx),
                                args.rep)
                hs = tk.head_stats(q, k, bt, sl, scale, max_seq_len=mx)
                p2 = bench_cuda(lambda: tk.agreement_abs_sum(q, k, bt, sl, scale, hs.lse,
                                                             max_seq_len=mx), args.rep)
                sweep_lines.append(f"| {B} | {L} | pass 1 alone | {p1:.4f} | "
                                   f"{p1 / best_read:.2f} |")
                sweep_lines.append(f"| {B} | {L} | pass 2 alone | {p2:.4f} | "
                                   f"{p2 / best_read:.2f} |")
                for name, kw in VARIANTS.items():
                    try:
                        t = bench_cuda(stats(**kw), args.rep)
                        sweep_lines.append(f"| {B} | {L} | {name} | {t:.4f} | "
                                           f"{t / best_read:.2f} |")
                    except Exception as e:  # a variant that does not compile here
                        sweep_lines.append(f"| {B} | {L} | {name} | failed: "
                                           f"{type(e).__name__} | |")
                    print(sweep_lines[-1], flush=True)
            del q, k, bt, sl, cache
            torch.cuda.empty_cache()
    print()
    print("\n".join(lines))
    if sweep_lines:
        print("\n| batch | context | variant | stats (ms) | / read |\n|---|---|---|---|---|")
        print("\n".join(sweep_lines))


# ----------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------
def decode_model_path(name: str) -> str:
    if name == "bundled":
        from entropix_vllm.bundled import bundled_model_path
        return bundled_model_path()
    return name


def decode_worker(args) -> None:
    """Runs in its own process: one vLLM engine (``args.decode_worker`` is the
    sampler, ``default`` or ``entropix``); prints ``DECODE_RESULT {json}``
    mapping ``"B,L"`` to the time of one decode step in ms.

    For each batch B and context L: B prompts of L random token ids, served
    with ``max_tokens=1`` (prefill and one token) and ``max_tokens=1+N``
    (``ignore_eos``), alternately five times; one decode step is the
    difference of the fastest of each over N. Prefix caching stays on (vLLM's default), so after the
    first run every prompt but its last token is cached and the prefill
    adds little noise.
    """
    import json

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batches = [int(x) for x in (args.batches or "1,4").split(",")]
    contexts = [int(x) for x in (args.contexts or "128,512").split(",")]
    N = args.decode_tokens
    kw = dict(model=decode_model_path(args.decode_step), dtype="float32", seed=0,
              max_model_len=max(contexts) + N + 16, max_num_seqs=max(batches))
    if args.decode_worker == "entropix":
        kw["additional_config"] = {"sampler": "entropix"}
    llm = LLM(**kw)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    res = {}
    for B in batches:
        for L in contexts:
            prompts = [TokensPrompt(prompt_token_ids=torch.randint(
                100, vocab - 100, (L,), generator=g).tolist()) for _ in range(B)]

            def run(n):
                sps = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, seed=i)
                       for i in range(B)]
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sps, use_tqdm=False)
                t = time.perf_counter() - t0
                assert all(len(o.outputs[0].token_ids) == n for o in outs)
                return t

            run(1)
            t1, tn = [], []
            for _ in range(5):  # alternating, fastest of each
                t1.append(run(1))
                tn.append(run(1 + N))
            t1, tn = min(t1), min(tn)
            res[f"{B},{L}"] = (tn - t1) / N * 1e3
    print("DECODE_RESULT " + json.dumps(res), flush=True)


def decode_steps(args, sampler: str) -> dict:
    """``decode_worker`` in a fresh process (one engine per sampler)."""
    import json
    import subprocess

    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--device", "cpu",
           "--decode-worker", sampler, "--decode-step", args.decode_step,
           "--decode-tokens", str(args.decode_tokens)]
    if args.batches:
        cmd += ["--batches", args.batches]
    if args.contexts:
        cmd += ["--contexts", args.contexts]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("DECODE_RESULT ")][-1]
    return json.loads(line[len("DECODE_RESULT "):])


def run_cpu(args):
    torch.set_num_threads(args.threads)
    batches = [int(x) for x in (args.batches or "1,4").split(",")]
    contexts = [int(x) for x in (args.contexts or "128,512").split(",")]
    H, HKV, D, BS = args.heads, args.kv_heads, args.head_size, args.block_size
    steps = {}
    if args.decode_step:
        import json

        with open(os.path.join(decode_model_path(args.decode_step), "config.json")) as f:
            mc = json.load(f)
        H, HKV = mc["num_attention_heads"], mc.get("num_key_value_heads", mc["num_attention_heads"])
        D = mc.get("head_dim") or mc["hidden_size"] // H
        BS = 128
        for sampler in ("default", "entropix"):
            steps[sampler] = decode_steps(args, sampler)
    dtype = DTYPES[args.dtype] if args.dtype != "bfloat16" else torch.float32
    scale = D ** -0.5
    has_cpp = ops.cpp_available() and hasattr(torch.ops.entropix, "paged_attention_stats")
    print(f"# Attention statistics benchmark, CPU ({datetime.date.today().isoformat()})\n")
    print(f"- device: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"- versions: {versions()}")
    print(f"- layer: H={H}, H_kv={HKV}, D={D}, block size {BS}, {dtype} cache (vLLM layout view)")
    print(f"- cpp backend: {'built' if has_cpp else 'not built (column not measured)'}")
    print("- timing: best of up to 50 runs (0.5 s) per entry, 5 for the torch reference\n")
    if steps:
        print(f"- one decode step: vLLM `LLM.generate` of {os.path.basename(decode_model_path(args.decode_step).rstrip('/'))}"
              f" (fp32), (time for 1 + {args.decode_tokens} tokens - time for 1) / "
              f"{args.decode_tokens}, fastest of 5 alternating runs each, prefix cache warm; engine with the stock "
              f"sampler and with `sampler=entropix` (which includes the attention capture "
              f"and statistics); vLLM's own threads, not --threads\n")
    cols = ["batch", "context", "read K once, torch (ms)", "cpp (ms)", "cpp / read",
            "torch reference (ms)"]
    if args.interpret:
        cols.append("triton interpreter (ms)")
    if steps:
        cols += ["decode step, stock (ms)", "cpp / step", "decode step, entropix (ms)",
                 "entropix / stock"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for B in batches:
        for L in contexts:
            q, k, bt, sl, cache = make_inputs(B, L, H, HKV, D, BS, dtype, torch.device("cpu"))
            pos = torch.arange(L)

            def read_once():
                return k[bt[:, pos // BS].long(), (pos % BS)[None, :]].float().sum()

            t_read = bench_cpu(read_once)
            t_cpp = None
            if has_cpp:
                t_cpp = bench_cpu(lambda: ops.paged_attention_stats(q, k, bt, sl, scale,
                                                                    backend="cpp"))
            t_ref = bench_cpu(lambda: ops.paged_attention_stats(q, k, bt, sl, scale,
                                                                backend="torch"), max_reps=5)
            row = [str(B), str(L), fmt(t_read), fmt(t_cpp),
                   fmt(None if t_cpp is None else t_cpp / t_read, 2), fmt(t_ref)]
            if args.interpret:
                from entropix_vllm.triton_kernels import attn_stats as tk
                row.append(fmt(bench_cpu(lambda: tk.paged_attention_stats(
                    q, k, bt, sl, scale, max_seq_len=L), min_time=0.0, max_reps=1)))
            if steps:
                st, se = steps["default"][f"{B},{L}"], steps["entropix"][f"{B},{L}"]
                row += [fmt(st), fmt(None if t_cpp is None else t_cpp / st, 4), fmt(se),
                        fmt(se / st, 2)]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    if ARGS.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device; use --device cpu")
        run_cuda(ARGS)
    elif ARGS.decode_worker:
        decode_worker(ARGS)
    else:
        run_cpu(ARGS)
