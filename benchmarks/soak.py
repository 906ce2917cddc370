"""A bounded soak of ``vllm serve --sampler entropix`` on loopback (issue #11).

    python -P benchmarks/soak.py                          # starts its own server (bundled model)
    python -P benchmarks/soak.py --requests 300 --concurrency 16 --max-seconds 900
    python -P benchmarks/soak.py --url http://127.0.0.1:8100 --pid 12345   # an existing server

Bounded in count (``--requests``) and time (``--max-seconds``: no new request
after it), loopback only (the URL must be 127.0.0.1/localhost). The mix, drawn
with a fixed seed: Entropix chat, stock chat (``"entropix": false``), seeded
Entropix requests (re-sent from a quiet run first), streamed, logprobs,
completions, and streams the client cancels after a few chunks.

Reports (and ``--json FILE`` writes): requests, concurrency, cancels, 5xx,
other errors, unfinished (no finish_reason / connection error), seeded matches
against the quiet run, server memory (RSS of the server's process group)
before and after with the growth, requests running after the soak, and time.
Exit status 1 if any 5xx, unfinished request or seeded mismatch.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Name three primary colours.", "Explain in one sentence what a CPU does.",
           "Tell me a fun fact about octopuses.", "List two fruits that are red.",
           "How many legs does a spider have?", "Give me a tip for learning to cook."]
KINDS = ("entropix", "stock", "seeded", "stream", "logprobs", "completion", "cancel")
WEIGHTS = (3, 2, 2, 2, 1, 1, 1)


def group_rss(pgid: int) -> int:
    """RSS bytes of every process of a process group (Linux /proc)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:       # field 5: pgrp
                continue
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


class Soak:
    def __init__(self, url, model, timeout):
        self.url, self.model, self.timeout = url, model, timeout

    def body(self, kind, i, rng):
        prompt = PROMPTS[i % len(PROMPTS)]
        b = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
             "max_tokens": rng.choice((8, 16, 32)), "return_token_ids": True}
        if kind == "stock":
            b["vllm_xargs"] = {"entropix": False}
            b["temperature"] = 0.8
        elif kind == "seeded":
            b["seed"] = 1000 + i % 16
            b["max_tokens"] = 16
        elif kind == "logprobs":
            b["logprobs"] = True
            b["top_logprobs"] = 3
        elif kind in ("stream", "cancel"):
            b["stream"] = True
        elif kind == "completion":
            b = {"model": self.model, "prompt": prompt, "max_tokens": 16,
                 "return_token_ids": True}
        return b

    def send(self, kind, body):
        path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
        out = {"kind": kind, "status": None, "finished": False, "tokens": None,
               "cancelled": False}
        try:
            r = requests.post(self.url + path, json=body, timeout=self.timeout,
                              stream=bool(body.get("stream")))
            out["status"] = r.status_code
            if r.status_code != 200:
                return out
            if not body.get("stream"):
                data = r.json()
                c = data["choices"][0]
                out["finished"] = c.get("finish_reason") is not None
                out["tokens"] = c.get("token_ids")
                return out
            chunks = 0
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out["finished"] = True
                    break
                chunks += 1
                if kind == "cancel" and chunks >= 3:
                    r.close()              # the client goes away mid-stream
                    out["cancelled"] = out["finished"] = True
                    break
            return out
        except requests.RequestException as e:
            out["error"] = f"{type(e).__name__}: {e}"[:200]
            return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="an existing server (loopback); default: start one")
    ap.add_argument("--pid", type=int, help="with --url: the server's process group id, for memory")
    ap.add_argument("--model", help="model name (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from entropix_vllm import bundled

    model = args.model or bundled.bundled_model_path(build=False)
    server = None
    fig: dict = {}
    t_start = time.time()
    if args.url is None:
        from e2e_server import ENTROPIX_TRACE_PATH, ServerSpec, start_servers

        log_dir = tempfile.mkdtemp(prefix="entropix-soak-")
        # The e2e tests' trace path: vLLM's compile cache is keyed on
        # additional_config, so this start reuses their compiled model.
        flags = ["--sampler", "entropix",
                 f"--additional-config.entropix.trace_path={ENTROPIX_TRACE_PATH}"]
        server = start_servers([ServerSpec("soak", flags)], model, log_dir, timeout=900)["soak"]
        url, pgid = server.url, server.proc.pid
        print(f"server: {url} (log {server.log_path})", flush=True)
    else:
        url, pgid = args.url.rstrip("/"), args.pid
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address")
    try:
        soak = Soak(url, model, args.timeout)
        rng = random.Random(args.seed)
        # Quiet run: every seeded request alone.
        quiet = {}
        for i in range(16):
            b = soak.body("seeded", i, random.Random(i))
            quiet[b["seed"]] = soak.send("seeded", b)["tokens"]
        rss0 = group_rss(pgid) if pgid else None
        plan = [rng.choices(KINDS, WEIGHTS)[0] for _ in range(args.requests)]
        results = []
        t0 = time.time()
        deadline = t0 + args.max_seconds

        def job(i):
            if time.time() > deadline:
                return None
            kind = plan[i]
            return kind, soak.body(kind, i, random.Random(args.seed * 7919 + i)), \
                soak.send(kind, soak.body(kind, i, random.Random(args.seed * 7919 + i)))

        with cf.ThreadPoolExecutor(max_workers=args.concurrency) as ex:
            for r in ex.map(job, range(len(plan))):
                if r is not None:
                    results.append(r)
        elapsed = time.time() - t0
        time.sleep(2.0)
        rss1 = group_rss(pgid) if pgid else None
        metrics = requests.get(url + "/metrics", timeout=30).text
        running = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                      if l.startswith("vllm:num_requests_running"))
        kv = [float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
              if l.startswith("vllm:kv_cache_usage_perc")]
        outs = [o for _, _, o in results]
        seeded = [(b, o) for k, b, o in results if k == "seeded" and o["status"] == 200]
        matches = sum(1 for b, o in seeded if o["tokens"] == quiet[b["seed"]])
        fig.update({
            "requests": len(outs), "planned": args.requests, "concurrency": args.concurrency,
            "by_kind": {k: sum(1 for kk, _, _ in results if kk == k) for k in KINDS},
            "cancels": sum(1 for o in outs if o["cancelled"]),
            "status_5xx": sum(1 for o in outs if (o["status"] or 0) >= 500),
            "status_other_non_200": sum(1 for o in outs if o["status"] not in (200, None)
                                        and o["status"] < 500),
            "unfinished": sum(1 for o in outs if not o["finished"]),
            "seeded": len(seeded), "seeded_matches": matches,
            "rss_before_mb": None if rss0 is None else round(rss0 / 2 ** 20, 1),
            "rss_after_mb": None if rss1 is None else round(rss1 / 2 ** 20, 1),
            "rss_growth_pct": None if not rss0 else round(100.0 * (rss1 - rss0) / rss0, 2),
            "running_after": running, "kv_cache_usage_after": kv[0] if kv else None,
            "soak_seconds": round(elapsed, 1), "total_seconds": round(time.time() - t_start, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    finally:
        if server is not None:
            log = Path(server.log_path).read_text(errors="replace")
            fig["server_log_tracebacks"] = log.count("Traceback")
            server.stop()
    print(json.dumps(fig, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1) + "\n")
    bad = fig["status_5xx"] or fig["unfinished"] or fig["seeded_matches"] != fig["seeded"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
