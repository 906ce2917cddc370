"""Sending the eval's requests: an OpenAI-compatible HTTP client, concurrent
requests, seeds and vote groups, and the server's Entropix trace.

Every sample is one request. A sampler runs ``seeds x vote`` samples per item
(one per item when it is deterministic: stock greedy), each with its own
request seed, derived from the eval's ``seed`` base, the seed index, the vote
index and the item id, so a sample's seed does not depend on which other items
or samplers are in the run.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import requests

from .samplers import SamplerConfig
from .tasks import Item


class EvalError(RuntimeError):
    """The server refused the eval's requests (bad sampler keys, wrong model...)."""


@dataclass
class Sample:
    item: int                 # index into the items
    group: int                # seed index
    vote: int                 # index inside the vote group
    seed: Optional[int]
    text: str = ""
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    response_id: Optional[str] = None
    off_argmax: Optional[int] = None     # tokens that are not the most likely one
    scored_tokens: int = 0               # tokens with logprobs behind off_argmax
    latency_s: float = 0.0
    error: Optional[str] = None


@dataclass
class SamplerRun:
    sampler: SamplerConfig
    samples: list                         # [item][group][vote] -> Sample
    wall_s: float
    trace: list = field(default_factory=list)   # this sampler's trace records


def sample_seed(base: int, group: int, vote: int, item_id: str) -> int:
    return zlib.crc32(f"{base}/{group}/{vote}/{item_id}".encode()) & 0x7FFFFFFF


class Client:
    """Posts chat / completion requests to ``base_url`` (``http://host:port/v1``)."""

    def __init__(self, base_url: str, model: Optional[str] = None, timeout: float = 600.0,
                 api_key: Optional[str] = None, retries: int = 2):
        base = base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.base_url = base
        self.timeout = timeout
        self.retries = retries
        self.headers = {"Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY', 'EMPTY')}"}
        self._local = threading.local()
        self.model = model or self.first_model()
        self.entropix_server = self._detect_entropix()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def first_model(self) -> str:
        try:
            r = self._session().get(f"{self.base_url}/models", headers=self.headers, timeout=30)
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (requests.RequestException, KeyError, IndexError, ValueError) as e:
            raise EvalError(f"cannot list the models of {self.base_url} ({e}); give --model") from None

    def _detect_entropix(self) -> bool:
        """Whether the server runs the Entropix sampler (it accepts ``vllm_xargs.entropix``)."""
        body = {"model": self.model, "prompt": "1", "max_tokens": 1, "temperature": 0,
                "vllm_xargs": {"entropix": False}}
        r = self._session().post(f"{self.base_url}/completions", json=body, headers=self.headers,
                                 timeout=self.timeout)
        if r.status_code == 200:
            return True
        if r.status_code == 400 and "Entropix" in r.text:
            return False
        raise EvalError(f"{self.base_url}/completions answered {r.status_code}: {r.text[:500]}")

    def post(self, item: Item, fields: Mapping, max_tokens: int, logprobs: bool) -> dict:
        """One request; returns the response JSON. 4xx raise :class:`EvalError`."""
        body = {"model": self.model, "max_tokens": item.max_tokens or max_tokens, **fields}
        if item.stop:
            body["stop"] = list(item.stop)
        if item.prompt is not None:
            url = f"{self.base_url}/completions"
            body["prompt"] = item.prompt
            if logprobs:
                body["logprobs"] = 2
        else:
            url = f"{self.base_url}/chat/completions"
            body["messages"] = list(item.messages)
            if logprobs:
                body["logprobs"] = True
                body["top_logprobs"] = 2
        last = None
        for attempt in range(self.retries + 1):
            try:
                r = self._session().post(url, json=body, headers=self.headers, timeout=self.timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.json()
                if 400 <= r.status_code < 500:
                    raise EvalError(f"the server refused a request ({r.status_code}): "
                                    f"{r.text[:1000]}")
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            time.sleep(0.5 * (attempt + 1))
        raise ConnectionError(last)


def _off_argmax(choice: dict) -> tuple[Optional[int], int]:
    """(tokens whose logprob is below the top-1 logprob, tokens counted).

    vLLM lists the sampled token first and then the most likely ones, so two
    top logprobs always hold the most likely token."""
    lp = choice.get("logprobs")
    if not lp:
        return None, 0
    off = n = 0
    if "content" in lp:                                   # chat
        for tok in lp.get("content") or []:
            tops = tok.get("top_logprobs") or []
            if not tops:
                continue
            n += 1
            off += max(t["logprob"] for t in tops) > tok["logprob"] + 1e-6
    else:                                                 # completions
        for chosen, tops in zip(lp.get("token_logprobs") or [], lp.get("top_logprobs") or []):
            if chosen is None or not tops:
                continue
            n += 1
            off += max(tops.values()) > chosen + 1e-6
    return off, n


def _fill(sample: Sample, resp: dict) -> None:
    choice = resp["choices"][0]
    if "message" in choice:
        sample.text = choice["message"].get("content") or ""
    else:
        sample.text = choice.get("text") or ""
    sample.finish_reason = choice.get("finish_reason")
    sample.response_id = resp.get("id")
    sample.completion_tokens = int((resp.get("usage") or {}).get("completion_tokens") or 0)
    sample.off_argmax, sample.scored_tokens = _off_argmax(choice)


class TraceTail:
    """Reads the records a server appends to its trace file from a given point on."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.offset = os.path.getsize(path) if path and os.path.exists(path) else 0

    def read_new(self) -> list:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1          # whole lines only
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def _trace_key(request_id: str) -> str:
    """The response id behind vLLM's internal request id (``<response id>-<8 chars>``)."""
    return request_id.rsplit("-", 1)[0] if "-" in request_id else request_id


def collect_trace(tail: TraceTail, runs: Sequence[SamplerRun], wait_s: float = 15.0) -> None:
    """Attach each Entropix run's trace records (matched by response id).

    The server writes its trace from a background thread, so this waits (up
    to ``wait_s``) until every token of the runs' Entropix requests is there.
    """
    owners: dict = {}
    expected = 0
    for run in runs:
        if not run.sampler.entropix:
            continue
        for s in iter_samples(run):
            if s.response_id:
                owners[s.response_id] = run
                expected += s.completion_tokens
    if not owners or tail.path is None:
        return
    got = 0
    deadline = time.monotonic() + wait_s
    while True:
        for rec in tail.read_new():
            run = owners.get(_trace_key(str(rec.get("request_id", ""))))
            if run is not None:
                run.trace.append(rec)
                got += 1
        if got >= expected or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def iter_samples(run: SamplerRun):
    for per_item in run.samples:
        for group in per_item:
            yield from group


def run_samplers(client: Client, items: Sequence[Item], samplers: Sequence[SamplerConfig], *,
                 seeds: int = 5, vote: int = 1, max_tokens: int = 24, concurrency: int = 32,
                 seed_base: int = 0, logprobs: bool = True, interleave: bool = False,
                 trace_path: Optional[str] = None,
                 progress: Optional[Callable[[int], None]] = None) -> list:
    """Run every sampler over every item; returns one :class:`SamplerRun` each.

    Samplers run one after another (so each one's tokens/s is its own) unless
    ``interleave``, which sends all of them at once (the tuner's candidates).
    ``progress(n)`` is called as requests finish.
    """
    tail = TraceTail(trace_path)
    runs = []

    def plan(sampler):
        groups = 1 if sampler.deterministic else seeds
        votes = 1 if sampler.deterministic else vote
        samples = [[[Sample(i, g, k, None if sampler.deterministic
                            else sample_seed(seed_base, g, k, it.id)) for k in range(votes)]
                    for g in range(groups)] for i, it in enumerate(items)]
        return SamplerRun(sampler=sampler, samples=samples, wall_s=0.0)

    def one(sampler, s):
        t0 = time.perf_counter()
        resp = client.post(items[s.item], sampler.request_fields(s.seed, client.entropix_server),
                           max_tokens, logprobs)
        _fill(s, resp)
        s.latency_s = time.perf_counter() - t0

    def execute(batch):
        """Run ``[(run, sample)]`` concurrently; the wall time is shared by all runs."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            futs = {ex.submit(one, run.sampler, s): (run, s) for run, s in batch}
            try:
                for fut in as_completed(futs):
                    run, s = futs[fut]
                    try:
                        fut.result()
                    except EvalError:
                        raise
                    except Exception as e:  # after the client's retries
                        s.error = f"{type(e).__name__}: {e}"
                    if progress:
                        progress(1)
            except EvalError:
                for f in futs:
                    f.cancel()
                raise
        return time.perf_counter() - t0

    all_runs = [plan(s) for s in samplers]
    if interleave:
        batch = [(run, s) for run in all_runs for s in iter_samples(run)]
        # Vote groups of one item next to each other: the prompt stays in the prefix cache.
        batch.sort(key=lambda rs: (rs[1].item, rs[1].group, rs[1].vote))
        wall = execute(batch)
        for run in all_runs:
            run.wall_s = wall
        runs = all_runs
    else:
        for run in all_runs:
            run.wall_s = execute([(run, s) for s in iter_samples(run)])
            runs.append(run)
    collect_trace(tail, runs)
    return runs


def count_requests(items: Sequence[Item], samplers: Sequence[SamplerConfig], seeds: int,
                   vote: int) -> int:
    return sum(len(items) * (1 if s.deterministic else seeds * vote) for s in samplers)
