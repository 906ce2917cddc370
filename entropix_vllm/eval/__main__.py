"""``python -m entropix_vllm.eval``: samplers side by side on the same questions.

Against a running OpenAI-compatible server (best: ``vllm serve MODEL --sampler
entropix``, so that stock and Entropix samplers run on one server)::

    python -m entropix_vllm.eval --base-url http://127.0.0.1:8000 --tasks heldout \\
        --sampler greedy --sampler t0.7-p0.9 --sampler minp0.1 \\
        --sampler entropix-classic --sampler entropix-smollm2 \\
        --seeds 5 --vote 5 --baseline greedy --out results.json --plot results.png

Prints one table row per sampler: accuracy with its 95% interval over items
(seeds averaged within an item), the paired difference against ``--baseline``,
maj@K / pass@K with ``--vote K``, mean output tokens, tokens/s, the share of
tokens that were not the most likely one, and (with ``--trace``, the server's
``trace_path``) the Entropix branch mix.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

from . import samplers as sampler_mod
from .cli import add_common_args, progress_bar
from .metrics import per_item_rows, summarize
from .output import family_table, plot, table, write_json
from .runner import Client, EvalError, count_requests, run_samplers
from .tasks import SCORERS, TaskFileError, load_tasks

DEFAULT_SAMPLERS = ("greedy", "t0.7-p0.9", "minp0.1", "entropix")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entropix_vllm.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--tasks", action="append", required=True, metavar="FILE|NAME",
                    help="JSONL task file, or a shipped one (dev, heldout, tiny); repeatable")
    ap.add_argument("--sampler", action="append", default=None, metavar="SPEC",
                    help="NAME or NAME:key=value,... (built-ins: "
                         + ", ".join(sampler_mod.BUILTIN) + "); repeatable")
    ap.add_argument("--samplers", default=None, metavar="FILE",
                    help="JSON file of named sampler configurations")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per sampler (default: %(default)s)")
    ap.add_argument("--vote", type=int, default=1, metavar="K",
                    help="K samples per item and seed; reports maj@K and pass@K")
    ap.add_argument("--baseline", default=None,
                    help="sampler the paired differences are against (default: the first)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N items")
    ap.add_argument("--by-family", action="store_true", help="also print accuracy per family")
    ap.add_argument("--out", default=None, metavar="JSON", help="results file")
    ap.add_argument("--plot", default=None, metavar="PNG", help="accuracy bars with intervals")
    args = ap.parse_args(argv)

    try:
        for name, v in (("--seeds", args.seeds), ("--vote", args.vote),
                        ("--max-tokens", args.max_tokens), ("--concurrency", args.concurrency)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        items = load_tasks(args.tasks, args.scorer, args.limit)
        configs = [sampler_mod.parse_cli(s) for s in (args.sampler or [])]
        if args.samplers:
            configs += sampler_mod.load_file(args.samplers)
        if not configs:
            configs = [sampler_mod.BUILTIN[n] for n in DEFAULT_SAMPLERS]
        configs = sampler_mod.unique(configs)
        names = [c.name for c in configs]
        baseline = args.baseline or names[0]
        if baseline not in names:
            raise ValueError(f"--baseline {baseline!r} is not one of the samplers ({', '.join(names)})")
        client = Client(args.base_url, args.model)
        if any(c.entropix for c in configs) and not client.entropix_server:
            raise EvalError(f"{client.base_url} does not run the Entropix sampler; start it with "
                            "--sampler entropix (or drop the Entropix samplers)")
    except (TaskFileError, sampler_mod.SamplerSpecError, EvalError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    total = count_requests(items, configs, args.seeds, args.vote)
    print(f"# {len(items)} items x {len(configs)} samplers ({', '.join(names)}), "
          f"{args.seeds} seeds, vote {args.vote}: {total} requests to {client.base_url} "
          f"(model {client.model})", file=sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    bar = progress_bar(total, "eval", args.no_progress)
    try:
        runs = run_samplers(client, items, configs, seeds=args.seeds, vote=args.vote,
                            max_tokens=args.max_tokens, concurrency=args.concurrency,
                            seed_base=args.seed, logprobs=not args.no_logprobs,
                            trace_path=args.trace, progress=bar.update)
    except EvalError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    base_run = runs[names.index(baseline)]
    summaries = [summarize(r, items, args.vote, base_run) for r in runs]
    print(table(summaries, args.vote))
    if args.by_family:
        print()
        print(family_table(summaries))
    if args.trace is None and any(c.entropix for c in configs):
        print("(no --trace: the Entropix branch mix is not shown)", file=sys.stderr)
    if args.out:
        write_json(args.out, {
            "command": " ".join(["python -m entropix_vllm.eval"] + list(argv if argv is not None
                                                                          else sys.argv[1:])),
            "started": started.isoformat(timespec="seconds"), "wall_s": time.perf_counter() - t0,
            "base_url": client.base_url, "model": client.model, "tasks": args.tasks,
            "items": len(items), "seeds": args.seeds, "vote": args.vote,
            "max_tokens": args.max_tokens, "seed_base": args.seed, "baseline": baseline,
            "summaries": summaries,
            "samples": {r.sampler.name: per_item_rows(r, items) for r in runs},
        })
        print(f"results: {args.out}", file=sys.stderr)
    if args.plot:
        plot(args.plot, summaries, args.vote,
             title=plot_title(client.model, len(items), args.seeds, args.vote))
        print(f"plot: {args.plot}", file=sys.stderr)
    failed = sum(s["errors"] for s in summaries)
    return 1 if failed else 0


def plot_title(model: str, items: int, seeds: int, vote) -> str:
    """The plot's title: the model, the items and the samples behind each bar."""
    per_item = seeds * (vote or 1)
    how = f"{seeds} seed{'s' if seeds != 1 else ''}" + (f" x vote {vote}" if vote else "")
    return f"{model.rsplit('/', 1)[-1]}: {items} items, {per_item} samples per item ({how})"


if __name__ == "__main__":
    sys.exit(main())
