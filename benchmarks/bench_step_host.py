"""Benchmark: the host (Python) time of one Entropix step inside a real vLLM engine.

Question answered: how much time per decode step does the plugin spend on the
engine's thread, and where? On a GPU the kernels run asynchronously, so what
the engine thread pays per step is this host time; on the CPU the kernels run
synchronously inside it, so the table separates them out.

One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; the bundled model
unless ``--model``) with ``--sampler entropix`` serves ``--concurrency``
requests of ``--tokens`` tokens twice: all rows Entropix, then all rows stock
(``extra_args={"entropix": False}``, vLLM's own sampler inside the same
engine). Wrappers time, per decode step (steps with as many rows as requests):

* ``sample``: the whole ``EntropixSamplerV1.sample`` call (stock rows: vLLM's
  ``Sampler.sample``, which it calls);
* its parts: ``batch`` (the rows' slots and settings), ``gather`` (the rows'
  coefficient table on the device), ``noise``, ``prev_is_cot``,
  ``attn lookup`` (the sampler's read of the captured figures), ``step``
  (``entropix_step``: the kernels; on CPU their compute), ``trace`` (the hand-off
  to the trace writer thread, with ``--trace``);
* ``kernels``: time inside the project's C++/Triton ops (``torch.ops.entropix``)
  during ``sample``; ``host`` = ``sample`` - ``kernels``: the Python and torch
  dispatch the engine thread pays whatever the device;
* ``capture``: the attention capture after the chosen layer (forward pass).

Medians over the decode steps, ms. Also: the trace writer's own cost
(``--trace``): records per second its background thread formats (it holds the
GIL while it does).

    python -P benchmarks/bench_step_host.py                       # CPU, bundled model
    python -P benchmarks/bench_step_host.py --concurrency 1,16,64 --tokens 24 --trace
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict


def _parse(s: str):
    return [int(t) for t in s.split(",") if t]


class Timers:
    """Accumulates wall time per name, per step (``step()`` closes a step)."""

    def __init__(self):
        self.cur = defaultdict(float)
        self.steps = []

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.cur[name] += time.perf_counter() - t0

    def wrap(self, owner, attr: str, name: str, restore: list):
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        orig = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            with self.time(name):
                return orig(*args, **kwargs)

        if isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(wrapper))
            restore.append((owner, attr, raw))
        else:
            setattr(owner, attr, wrapper)
            restore.append((owner, attr, raw if raw is not None else orig))

    def close_step(self, keep: bool):
        if keep and self.cur:
            self.steps.append(dict(self.cur))
        self.cur = defaultdict(float)

    def medians(self):
        names = sorted({n for s in self.steps for n in s})
        return {n: statistics.median(s.get(n, 0.0) for s in self.steps) * 1e3 for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the bundled model)")
    ap.add_argument("--concurrency", type=_parse, default=[1, 16, 48])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--trace", action="store_true", help="trace on (the hand-off is timed)")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from entropix_vllm import bundled, ops
    from entropix_vllm.integration import attention, mrv1

    model = args.model or bundled.bundled_model_path()
    tmp = tempfile.mkdtemp(prefix="bench_step_host_")
    trace = os.path.join(tmp, "trace.jsonl") if args.trace else None
    section = {"trace_path": trace} if trace else {}
    cuda = torch.cuda.is_available()
    llm = LLM(model, dtype="bfloat16" if cuda else "float32", max_model_len=1024,
              max_num_seqs=max(args.concurrency),
              additional_config={"sampler": "entropix", "entropix": section})
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    sampler = runner.sampler
    Cls = type(sampler)
    t = Timers()
    restore: list = []
    t.wrap(Cls, "sample", "sample", restore)
    t.wrap(sampler.slots, "update", "batch", restore)
    t.wrap(sampler.rows, "noise", "noise", restore)
    t.wrap(Cls, "_prev_is_cot", "prev_is_cot", restore)
    t.wrap(attention, "attention_stats_for_sampler", "attn lookup", restore)
    t.wrap(mrv1.entropix_step_mod, "entropix_step", "step", restore)
    t.wrap(sampler.runtime, "trace_rows", "trace", restore)
    t.wrap(sampler.rows, "gather", "gather", restore)
    t.wrap(attention._Capture, "on_forward", "capture", restore)
    # kernel time: the resolved implementations, wrapped where ops looks them up
    orig_impl = ops._implementation

    def timed_impl(op, backend, device_type):
        fn = orig_impl(op, backend, device_type)

        def run(*a, **k):
            with t.time("kernels" if op != "paged_attention_stats" else "capture kernels"):
                return fn(*a, **k)
        return run

    ops._implementation = timed_impl
    restore.append((ops, "_implementation", orig_impl))

    words = ["river", "lamp", "orbit", "violin", "cactus", "harbor", "quartz", "meadow"]
    results = []
    try:
        for c in args.concurrency:
            prompts = [f"Tell a story about a {words[i % len(words)]} (#{i})." for i in range(c)]
            for mode in ("entropix", "stock"):
                extra = None if mode == "entropix" else {"entropix": False}
                sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=1.0,
                                    extra_args=extra)
                llm.generate(prompts[:2], SamplingParams(max_tokens=2, extra_args=extra),
                             use_tqdm=False)  # warm-up
                t.steps.clear()
                orig_sample = Cls.sample

                def sample(self, logits, *a, **k):
                    out = orig_sample(self, logits, *a, **k)
                    t.close_step(keep=logits.shape[0] == c)
                    return out

                Cls.sample = sample
                try:
                    t0 = time.perf_counter()
                    outs = llm.generate(prompts, sp, use_tqdm=False)
                    wall = time.perf_counter() - t0
                finally:
                    Cls.sample = orig_sample
                ntok = sum(len(o.outputs[0].token_ids) for o in outs)
                med = t.medians()
                med["decode steps"] = len(t.steps)
                med["tok/s"] = ntok / wall
                results.append((c, mode, med))
                print(f"(concurrency {c}, {mode}: {len(t.steps)} steps)", file=sys.stderr,
                      flush=True)
    finally:
        for owner, attr, orig in reversed(restore):
            setattr(owner, attr, orig)

    cols = ["sample", "kernels", "host", "batch", "gather", "noise", "prev_is_cot", "attn lookup",
            "step", "trace", "capture", "capture kernels"]
    dev = (torch.cuda.get_device_name(0) if cuda else
           f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} torch threads")
    print(f"## Host time per decode step inside a vLLM engine "
          f"({datetime.date.today().isoformat()})\n")
    print(f"- device: {dev}; vLLM {vllm.__version__}; torch {torch.__version__}; model "
          f"{os.path.basename(model)}; Entropix ops: {ops.describe('cuda' if cuda else 'cpu')}")
    print(f"- {args.tokens} tokens per request, temperature 1; trace "
          f"{'on' if trace else 'off'}; medians over the decode steps, ms; 'host' = sample - "
          f"kernels (the engine thread's cost when kernels run asynchronously)\n")
    print("| concurrency | rows | " + " | ".join(cols) + " | decode steps | tok/s |")
    print("|---" * (len(cols) + 4) + "|")
    for c, mode, med in results:
        if "sample" in med:
            med["host"] = med["sample"] - med.get("kernels", 0.0)
        cells = [f"{med[n]:.3f}" if n in med else "-" for n in cols]
        print(f"| {c} | {mode} | " + " | ".join(cells) +
              f" | {med['decode steps']} | {med['tok/s']:.1f} |")
    if trace:
        from entropix_vllm.trace import TraceWriter
        print()
        print(trace_writer_rate(TraceWriter, tmp))
    del llm


def trace_writer_rate(TraceWriter, tmp: str, rows: int = 64, batches: int = 200) -> str:
    """Records per second the trace thread formats, and the caller's submit cost."""
    import torch

    w = TraceWriter(os.path.join(tmp, "rate.jsonl"))
    tensors = {n: torch.rand(rows) for n in ("entropy", "varentropy", "attn_entropy",
                                             "attn_varentropy", "agreement",
                                             "interaction_strength", "temperature", "top_p",
                                             "min_p")}
    tensors.update(token_id=torch.randint(0, 50000, (rows,)), branch=torch.randint(0, 5, (rows,)),
                   top_k=torch.randint(1, 128, (rows,)))
    ids = [f"req-{i}" for i in range(rows)]
    idx = list(range(rows))
    t0 = time.perf_counter()
    for _ in range(batches):
        w.submit(ids, idx, tensors)
    t_submit = (time.perf_counter() - t0) / batches
    w.flush()
    total = time.perf_counter() - t0
    w.close()
    return (f"Trace writer: submit of {rows} rows {t_submit * 1e3:.3f} ms on the caller; "
            f"{rows * batches / total:,.0f} records/s formatted and written by the thread "
            f"({total / batches * 1e3:.3f} ms per {rows}-row step)")


if __name__ == "__main__":
    main()
