"""End-to-end cost of the Entropix sampler: ``vllm bench throughput`` with and
without ``--sampler entropix``, same model, same random prompts, same flags.

    python benchmarks/bench_throughput.py                      # the bundled model, CPU-sized run
    python benchmarks/bench_throughput.py --model meta-llama/Llama-3.1-8B-Instruct \\
        --num-prompts 1000 --input-len 512 --output-len 256 -- --tensor-parallel-size 1

Runs the stock sampler and Entropix alternately, ``--repeats`` times each
(each a fresh ``vllm bench throughput`` process), and reports each one's
fastest run, so that a first run's compilation (vLLM compiles the model per
configuration and caches it) does not count: a markdown table with device,
vLLM version, shapes, requests/s, output tokens/s and the Entropix/stock ratio. Arguments
after ``--`` go to both runs unchanged (engine flags). On CPU it sets
``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 2) and uses ``--dtype float32``
unless given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _run(vllm: str, model: str, args, extra, sampler: str, env) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [vllm, "bench", "throughput", "--model", model, "--dataset-name", "random",
               "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--seed", "0", "--output-json", out,
               "--sampler", sampler, *extra]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per sampler; the fastest counts")
    args = ap.parse_args(argv)

    import torch
    import vllm

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if "--dtype" not in extra:
            extra = ["--dtype", "float32", *extra]
    model = args.model
    if model is None:
        from entropix_vllm.bundled import bundled_model_path
        model = bundled_model_path()
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")

    runs = {"default": [], "entropix": []}
    for _ in range(max(1, args.repeats)):
        for sampler in runs:
            runs[sampler].append(_run(vllm_bin, model, args, extra, sampler, env))
    stock, ent = (min(runs[s], key=lambda r: r["elapsed_time"]) for s in ("default", "entropix"))

    def out_tok_s(r):
        return r["num_requests"] * args.output_len / r["elapsed_time"]

    print(f"\n`python benchmarks/bench_throughput.py {' '.join(sys.argv[1:])}`, "
          f"{datetime.date.today()}, {_device()}, vLLM {vllm.__version__}, torch {torch.__version__}; "
          f"model {os.path.basename(model.rstrip('/'))}, {args.num_prompts} prompts, "
          f"random input {args.input_len} / output {args.output_len} tokens, extra flags: "
          f"{' '.join(extra) or 'none'}; fastest of {args.repeats} runs each "
          f"(all elapsed times: stock {[round(r['elapsed_time'], 2) for r in runs['default']]}, "
          f"entropix {[round(r['elapsed_time'], 2) for r in runs['entropix']]} s)\n")
    print("| sampler | elapsed (s) | requests/s | output tokens/s | vs stock |")
    print("|---|---|---|---|---|")
    for name, r in (("stock (vLLM)", stock), ("entropix", ent)):
        print(f"| {name} | {r['elapsed_time']:.2f} | {r['requests_per_second']:.2f} | "
              f"{out_tok_s(r):.1f} | {out_tok_s(r) / out_tok_s(stock):.2f} |")


if __name__ == "__main__":
    main()
