"""``python -m entropix_vllm.tune``: fit Entropix coefficients to a model and a task set.

Against a running ``vllm serve MODEL --sampler entropix
--additional-config.entropix.trace_path=FILE`` (every candidate is sent as
per-request ``entropix_<name>`` keys, so the server never restarts)::

    python -m entropix_vllm.tune --base-url http://127.0.0.1:8000 --trace FILE \\
        --tasks dev --heldout heldout --name my-model --out my-model.json

1. **Calibration** (task-free): the dev prompts are answered once with every
   token taken by the argmax branch (the greedy path through the Entropix
   sampler), and the trace gives the model's own distribution of entropy and
   varentropy there. Thresholds are searched as *quantiles* of that
   distribution, so the same search fits a model whose figures sit anywhere.
2. **Search** on the dev split: random candidates from :data:`SPACE` (seeded),
   each answered ``--dev-vote`` times per item; successive halving keeps the
   best third for more samples with fresh seeds, until ``--keep`` remain; the
   winner has the best objective on all its dev samples. The objective is the
   mean of single-sample accuracy and maj@K, over candidates whose share of
   tokens drawn by a sampled branch (explore, resample, adaptive; from the
   trace) is at least ``--min-sampled`` (a preset that is greedy in disguise
   does not qualify).
3. **Report** on the held-out split, which the search never saw: the preset
   against greedy, the stock samplers and the classic preset (and the
   calibration alone), with the eval harness's table and intervals.
4. **Preset file**: the coefficients that differ from SPEC's defaults, the
   model it was made for (``match``: the record of :mod:`entropix_vllm.model_id`
   of ``--model-dir``, default the server's model when that is a local folder,
   so that ``preset: auto`` picks it on that model), and its provenance
   (command, data, calibration, dev and held-out results), ready for
   ``--additional-config.entropix.preset=FILE`` or ``.presets=FILE``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .config import EntropixConfig, EntropixConfigError
from .contract import K_MAX
from .eval import samplers as sampler_mod
from .eval.cli import add_common_args, progress_bar
from .eval.metrics import summarize
from .eval.output import table
from .eval.runner import Client, EvalError, count_requests, run_samplers
from .eval.tasks import Item, TaskFileError, load_tasks
from .model_id import ModelIdError, ModelSource, identify

#: A threshold this large never fires (the figures are finite bits / bits^2).
OFF = 1.0e6


# ----------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched dimension; ``kind``: uniform, log, int, choice or quantile
    (a probability; the coefficient is that quantile of the calibration
    figure ``of``; >= 1 switches the threshold off)."""

    name: str
    kind: str
    lo: float = 0.0
    hi: float = 1.0
    choices: tuple = ()
    of: str = ""

    def draw(self, rng: random.Random):
        if self.kind == "choice":
            return rng.choice(self.choices)
        if self.kind == "int":
            return rng.randint(int(self.lo), int(self.hi))
        if self.kind == "log":
            return math.exp(rng.uniform(math.log(self.lo), math.log(self.hi)))
        return rng.uniform(self.lo, self.hi)


#: What the tuner searches: the thresholds (as quantiles of the model's own
#: figures), the base values and the coefficients that set how hot each
#: sampled branch draws. Everything else keeps SPEC's defaults.
SPACE: tuple = (
    Param("low_ent_thresh", "quantile", 0.3, 0.8, of="entropy"),
    Param("low_vent_thresh", "choice", choices=(0.5, 0.75, 0.9, 1.0), of="varentropy"),
    Param("med_ent_thresh", "quantile", 0.5, 1.0, of="entropy"),
    Param("high_ent_thresh", "choice", choices=(0.9, 0.97, 1.0), of="entropy"),
    Param("high_vent_thresh", "choice", choices=(0.6, 0.7, 0.75, 0.8, 0.9, 1.0), of="varentropy"),
    Param("temperature", "uniform", 0.7, 1.8),
    Param("top_k", "int", 5, 64),
    Param("top_p", "uniform", 0.7, 1.0),
    Param("min_p", "choice", choices=(0.0, 0.02, 0.05, 0.1, 0.2)),
    Param("n_adaptive_samples", "choice", choices=(2, 3, 4, 5, 6, 8)),
    Param("ada_temp_logits", "choice", choices=(0.0, 0.01, 0.03, 0.1)),
    Param("ada_temp_attn", "choice", choices=(0.0, 0.1, 0.2)),
    Param("ada_min_p", "choice", choices=(0.0, 0.1, 0.5)),
    Param("lehv_max_temp", "log", 0.05, 1.5),
    Param("hehv_min_temp", "log", 0.05, 2.0),
)


@dataclass
class Calibration:
    """Quantiles of the model's entropy and varentropy on the dev prompts."""

    values: dict                  # figure -> sorted list of floats

    def quantile(self, figure: str, q: float) -> float:
        if q >= 1.0:
            return OFF
        xs = self.values[figure]
        if not xs:
            raise ValueError(f"no {figure} values in the calibration trace")
        pos = q * (len(xs) - 1)
        i = int(math.floor(pos))
        j = min(i + 1, len(xs) - 1)
        return xs[i] + (xs[j] - xs[i]) * (pos - i)

    def summary(self) -> dict:
        qs = (0.1, 0.25, 0.5, 0.75, 0.9, 0.97)
        return {f: {f"q{int(q * 100)}": round(self.quantile(f, q), 4) for q in qs}
                | {"tokens": len(xs)} for f, xs in self.values.items()}


def coefficients(draw: dict, cal: Calibration) -> dict:
    """The Entropix coefficients of one drawn point (quantiles resolved, limits kept)."""
    out = {}
    for p in SPACE:
        v = draw[p.name]
        if p.of:
            v = cal.quantile(p.of, float(v))
        out[p.name] = v
    # Thresholds in their order (low <= med <= high); round for a readable preset.
    out["med_ent_thresh"] = max(out["med_ent_thresh"], out["low_ent_thresh"])
    out["high_ent_thresh"] = max(out["high_ent_thresh"], out["med_ent_thresh"])
    for k in ("low_ent_thresh", "low_vent_thresh", "med_ent_thresh", "high_ent_thresh",
              "high_vent_thresh", "temperature", "top_p", "lehv_max_temp", "hehv_min_temp"):
        out[k] = round(float(out[k]), 4)
    widen = 1.0 + EntropixConfig().lehv_top_k_agree_coef
    out["top_k"] = int(min(out["top_k"], K_MAX // widen))
    EntropixConfig().replace(out)            # raises if the point is not a valid config
    return out


def draw_points(n: int, seed: int, include: Sequence[dict] = ()) -> list:
    rng = random.Random(seed)
    pts = [dict(p) for p in include]
    while len(pts) < n:
        pts.append({p.name: p.draw(rng) for p in SPACE})
    return pts


#: The first candidates, before the random ones: near-greedy adaptive points
#: (argmax on the confident half, best-of-n elsewhere) at a few temperatures.
SEED_POINTS = (
    # run 1's winner: argmax on the confident 60%, best-of-5 at T0 = 1 elsewhere.
    {"low_ent_thresh": 0.6, "low_vent_thresh": 1.0, "med_ent_thresh": 1.0, "high_ent_thresh": 1.0,
     "high_vent_thresh": 1.0, "temperature": 1.0, "top_k": 27, "top_p": 0.9, "min_p": 0.03,
     "n_adaptive_samples": 5, "ada_temp_logits": 0.0, "ada_temp_attn": 0.0, "ada_min_p": 0.0,
     "lehv_max_temp": 1.0, "hehv_min_temp": 1.0},
    # ... and the high-varentropy quarter sent to a cool explore branch (the dev
    # traces: deviations from argmax at varentropy >= 10 bits^2 hurt more than help).
    {"low_ent_thresh": 0.6, "low_vent_thresh": 1.0, "med_ent_thresh": 1.0, "high_ent_thresh": 1.0,
     "high_vent_thresh": 0.72, "temperature": 1.3, "top_k": 27, "top_p": 0.9, "min_p": 0.03,
     "n_adaptive_samples": 4, "ada_temp_logits": 0.0, "ada_temp_attn": 0.0, "ada_min_p": 0.0,
     "lehv_max_temp": 0.3, "hehv_min_temp": 1.0},
    {"low_ent_thresh": 0.6, "low_vent_thresh": 1.0, "med_ent_thresh": 1.0, "high_ent_thresh": 1.0,
     "high_vent_thresh": 0.72, "temperature": 1.3, "top_k": 27, "top_p": 0.9, "min_p": 0.03,
     "n_adaptive_samples": 4, "ada_temp_logits": 0.0, "ada_temp_attn": 0.0, "ada_min_p": 0.0,
     "lehv_max_temp": 0.1, "hehv_min_temp": 1.0},
)


# ----------------------------------------------------------------------------
# Evaluation of candidates
# ----------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    draw: dict
    coeffs: dict
    rounds: list = field(default_factory=list)      # summaries, one per round
    samples: list = field(default_factory=list)     # SamplerRuns

    def sampler(self) -> sampler_mod.SamplerConfig:
        return sampler_mod.build(self.name, {"preset": "classic", **self.coeffs})


def objective(summary: dict, min_sampled: float) -> Optional[float]:
    """Mean of accuracy and maj@K; None when too few tokens are sampled."""
    br = summary.get("branches") or {}
    share = br.get("sampled_share")
    if share is None or share < min_sampled:
        return None
    acc = summary["accuracy"]["mean"]
    maj = summary.get("maj", {}).get("mean", acc)
    return 0.5 * (acc + maj)


def pooled_objective(cand: Candidate, min_sampled: float) -> Optional[float]:
    """The objective over all of a candidate's rounds (weighted by samples)."""
    vals, weights = [], []
    for s in cand.rounds:
        o = objective(s, min_sampled)
        if o is None:
            return None
        vals.append(o)
        weights.append(s["samples"])
    return sum(v * w for v, w in zip(vals, weights)) / sum(weights) if vals else None


def _sha256(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _task_paths(specs):
    from .eval.tasks import resolve_task_path
    return [str(resolve_task_path(s)) for s in specs]


def model_match(model: str, explicit: bool) -> tuple:
    """``(match record or None, note)`` for the served model: ``model`` is
    ``--model-dir`` (``explicit``) or the server's model name. An explicit
    folder that cannot be identified raises ``ModelIdError``; a server's model
    name that is no local folder gives no record and a note saying how to add
    one later."""
    try:
        ident = identify(ModelSource(model))
    except ModelIdError as e:
        if explicit:
            raise
        return None, (f"the preset records no model ({model!r}: {e}); `preset: auto` will not "
                      "pick it. Add the record with `python -m entropix_vllm.model_id MODEL_DIR "
                      "--add-to PRESET.json`, or run the tuner with --model-dir MODEL_DIR")
    return ident.record(), f"the preset records the model {ident.model} (fingerprint {ident.fingerprint})"


class TuneError(Exception):
    """A tuning run cannot go on; the message says why (exit code 2)."""


@dataclass
class TuneRun:
    """What every step of a tuning run reads."""

    args: argparse.Namespace
    client: Client
    dev: list
    held: list
    command: str

    def log(self, *a) -> None:
        print(*a, file=sys.stderr, flush=True)

    def requests(self, items, samplers, *, desc: str, total: int, seeds: int, vote: int,
                 seed_base: int, **kw) -> list:
        """``run_samplers`` with a progress bar; a server error is a :class:`TuneError`."""
        a = self.args
        bar = progress_bar(total, desc, a.no_progress)
        try:
            return run_samplers(self.client, items, samplers, seeds=seeds, vote=vote,
                                seed_base=seed_base, progress=bar.update,
                                max_tokens=a.max_tokens, concurrency=a.concurrency,
                                logprobs=not a.no_logprobs, trace_path=a.trace, **kw)
        except EvalError as e:
            raise TuneError(str(e)) from None
        finally:
            bar.close()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m entropix_vllm.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--tasks", action="append", required=True, metavar="FILE|NAME",
                    help="dev task files: what the search fits (repeatable)")
    ap.add_argument("--heldout", action="append", required=True, metavar="FILE|NAME",
                    help="held-out task files: what the result is reported on (repeatable)")
    ap.add_argument("--name", required=True, help="the preset's name")
    ap.add_argument("--out", required=True, metavar="JSON", help="where to write the preset")
    ap.add_argument("--trials", type=int, default=12, help="random candidates (default: %(default)s)")
    ap.add_argument("--keep", type=int, default=2,
                    help="candidates left after successive halving (default: %(default)s)")
    ap.add_argument("--dev-vote", type=int, default=3,
                    help="samples per dev item and round (default: %(default)s)")
    ap.add_argument("--vote", type=int, default=5,
                    help="samples per held-out item: accuracy over them, maj@K and pass@K "
                         "(default: %(default)s)")
    ap.add_argument("--final-seeds", type=int, default=1,
                    help="vote groups per held-out item (default: %(default)s)")
    ap.add_argument("--min-sampled", type=float, default=0.2,
                    help="least share of tokens drawn by a sampled branch (default: %(default)s)")
    ap.add_argument("--search-seed", type=int, default=0, help="seed of the random search")
    ap.add_argument("--results", default=None, metavar="JSON",
                    help="also write every round's figures here")
    ap.add_argument("--model-dir", default=None, metavar="DIR",
                    help="the served model's folder, recorded as the preset's match so that "
                         "`preset: auto` picks it (default: the server's model, if it is a "
                         "local folder)")
    return ap.parse_args(argv)


def open_run(args, command: str) -> TuneRun:
    """The tasks (dev and held-out disjoint) and the server (running Entropix)."""
    if args.trace is None:
        raise TuneError("--trace FILE (the server's trace_path) is required: the calibration "
                        "and the sampled-branch share are read from it")
    try:
        dev = load_tasks(args.tasks, args.scorer)
        held = load_tasks(args.heldout, args.scorer)
        client = Client(args.base_url, args.model)
    except (TaskFileError, EvalError, ValueError) as e:
        raise TuneError(str(e)) from None
    overlap = {it.question for it in dev} & {it.question for it in held}
    if overlap:
        raise TuneError(f"{len(overlap)} held-out questions are also dev questions, e.g. "
                        f"{sorted(overlap)[0]!r}")
    if not client.entropix_server:
        raise TuneError(f"{client.base_url} does not run the Entropix sampler")
    return TuneRun(args, client, dev, held, command)


def calibrate(run: TuneRun) -> Tuple[Calibration, float]:
    """Step 1: the dev prompts on the greedy path through Entropix; the model's
    entropy and varentropy there, and the seconds one request took."""
    probe = sampler_mod.build("calibration", {"preset": "classic", "low_ent_thresh": OFF,
                                              "low_vent_thresh": OFF})
    run.log(f"# 1/3 calibration: {len(run.dev)} dev prompts on the greedy path through Entropix")
    t0 = time.perf_counter()
    [result] = run.requests(run.dev, [probe], desc="calibration", total=len(run.dev), seeds=1,
                            vote=1, seed_base=run.args.seed)
    per_req = (time.perf_counter() - t0) / max(1, len(run.dev))
    if not result.trace:
        raise TuneError(f"no trace records for the calibration requests in {run.args.trace}; "
                        "is it the server's trace_path?")
    cal = Calibration({f: sorted(float(r[f]) for r in result.trace if math.isfinite(float(r[f])))
                       for f in ("entropy", "varentropy")})
    run.log(f"  {len(result.trace)} tokens; entropy {cal.summary()['entropy']}; "
            f"varentropy {cal.summary()['varentropy']}")
    return cal, per_req


def final_samplers(run: TuneRun, cal: Calibration, best: "Candidate") -> list:
    """What the held-out report compares: greedy, the stock samplers, classic,
    the calibrated thresholds alone, and the tuned preset."""
    cal_only = sampler_mod.build("calibrated-thresholds", {"preset": "classic", **{
        k: v for k, v in coefficients(SEED_POINTS[0], cal).items() if k.endswith("_thresh")}})
    tuned = sampler_mod.build(run.args.name, {"preset": "classic", **best.coeffs})
    return [sampler_mod.BUILTIN["greedy"], sampler_mod.BUILTIN["t0.7-p0.9"],
            sampler_mod.BUILTIN["minp0.1"], sampler_mod.BUILTIN["entropix-classic"],
            cal_only, tuned]


@dataclass
class Search:
    """Step 2's outcome."""

    candidates: list
    schedule: list
    best: "Candidate"
    best_objective: float
    rounds: list


def halving_schedule(n: int, keep: int) -> list:
    """Candidates per round: a third survive each round, until ``keep`` remain."""
    schedule = []
    while True:
        schedule.append(n)
        if n <= keep:
            return schedule
        n = max(keep, math.ceil(n / 3))


def search(run: TuneRun, cal: Calibration, per_req: float) -> Search:
    """Step 2: random candidates from :data:`SPACE` and the seed points, by
    successive halving on the dev split; prints the estimate of the whole run."""
    a = run.args
    cands = []
    for i, pt in enumerate(draw_points(max(a.trials, len(SEED_POINTS)), a.search_seed,
                                       SEED_POINTS)):
        try:
            cands.append(Candidate(f"c{i:02d}", pt, coefficients(pt, cal)))
        except EntropixConfigError as e:      # a corner of the space the config refuses
            run.log(f"  skipped candidate {i}: {e}")
    schedule = halving_schedule(len(cands), a.keep)
    planned = sum(k * len(run.dev) * a.dev_vote for k in schedule)
    # the held-out step's requests, counted on its own samplers (any candidate stands in)
    planned_final = count_requests(run.held, final_samplers(run, cal, cands[0]),
                                   a.final_seeds, a.vote)
    run.log(f"# 2/3 search: {len(cands)} candidates, rounds of {schedule} on {len(run.dev)} dev "
            f"items x {a.dev_vote} samples = {planned} requests; then {planned_final} held-out "
            f"requests. Estimate at {1 / per_req:.1f} requests/s: "
            f"{(planned + planned_final) * per_req / 60:.0f} min")
    alive, rounds = list(cands), []
    for r, size in enumerate(schedule):
        alive = alive[:size]
        results = run.requests(run.dev, [c.sampler() for c in alive], desc=f"search {r + 1}",
                               total=size * len(run.dev) * a.dev_vote, seeds=1,
                               vote=a.dev_vote, seed_base=a.seed + 1000 * (r + 1),
                               interleave=True)
        for c, result in zip(alive, results):
            s = summarize(result, run.dev, a.dev_vote)
            c.rounds.append(s)
            rounds.append({"round": r, "candidate": c.name, "coefficients": c.coeffs,
                           "summary": {k: v for k, v in s.items() if k != "sampler"}})
        alive.sort(key=lambda c: -1.0 if pooled_objective(c, a.min_sampled) is None
                   else pooled_objective(c, a.min_sampled), reverse=True)
        run.log(f"  round {r + 1}: " + ", ".join(
            f"{c.name} {_fmt_obj(pooled_objective(c, a.min_sampled))}" for c in alive))
    best = alive[0]
    best_obj = pooled_objective(best, a.min_sampled)
    if best_obj is None:
        raise TuneError(f"no candidate drew at least {a.min_sampled:.0%} of its tokens with a "
                        "sampled branch; widen the space or lower --min-sampled")
    run.log(f"  best: {best.name} (dev objective {best_obj:.3f}): {best.coeffs}")
    return Search(cands, schedule, best, best_obj, rounds)


def heldout_report(run: TuneRun, cal: Calibration, best: "Candidate") -> list:
    """Step 3: the held-out split (never seen by the search), every final
    sampler side by side; prints the table, returns the summaries."""
    a = run.args
    finals = final_samplers(run, cal, best)
    n_final = count_requests(run.held, finals, a.final_seeds, a.vote)
    run.log(f"# 3/3 held-out: {len(run.held)} items, {len(finals)} samplers, {n_final} requests")
    results = run.requests(run.held, finals, desc="held-out", total=n_final,
                           seeds=a.final_seeds, vote=a.vote, seed_base=a.seed + 99991)
    summaries = [summarize(r, run.held, a.vote, results[0]) for r in results]
    print(table(summaries, a.vote))
    return summaries


def write_preset(run: TuneRun, cal: Calibration, found: Search, summaries: list,
                 match: Optional[dict], match_note: str, started, wall_s: float) -> None:
    """Step 4: the preset file (coefficients that differ from SPEC's, the model it
    matches, provenance) and, with ``--results``, every round's figures."""
    a = run.args
    defaults = EntropixConfig()
    best = found.best
    coeffs = {k: v for k, v in best.coeffs.items() if getattr(defaults, k) != v}
    heldout_rows = {s["sampler"]["name"]: {
        "accuracy": s["accuracy"], "maj": s.get("maj"), "pass": s.get("pass"),
        "vs_greedy": (s.get("vs_baseline") or {}).get("accuracy"),
        "maj_vs_greedy": (s.get("vs_baseline") or {}).get("maj"),
        "sampled_share": (s.get("branches") or {}).get("sampled_share"),
        "branch_mix": (s.get("branches") or {}).get("mix"),
        "off_argmax_share": s["off_argmax_share"], "mean_output_tokens": s["mean_output_tokens"],
    } for s in summaries}
    model = run.client.model
    preset = {
        "name": a.name,
        "description": f"Entropix coefficients fitted to {model.rsplit('/', 1)[-1]} by "
                       "python -m entropix_vllm.tune (see provenance).",
        "coefficients": coeffs,
        **({"match": match} if match else {}),
        "provenance": {
            "command": run.command, "date": started.isoformat(timespec="seconds"),
            "model": model, "max_tokens": a.max_tokens,
            "dev": {"tasks": a.tasks, "items": len(run.dev),
                    "sha256": _sha256(_task_paths(a.tasks))},
            "heldout": {"tasks": a.heldout, "items": len(run.held),
                        "sha256": _sha256(_task_paths(a.heldout)),
                        "samples_per_item": a.final_seeds * a.vote,
                        "results": heldout_rows},
            "calibration": cal.summary(),
            "search": {"candidates": len(found.candidates), "rounds": found.schedule,
                       "dev_vote": a.dev_vote, "search_seed": a.search_seed,
                       "min_sampled": a.min_sampled, "chosen": best.name, "draw": best.draw,
                       "dev_objective": found.best_objective,
                       "space": [p.name for p in SPACE]},
            "wall_s": round(wall_s, 1),
        },
    }
    Path(a.out).write_text(json.dumps(preset, indent=1) + "\n", encoding="utf-8")
    run.log(f"preset: {a.out} ({match_note})")
    if a.results:
        Path(a.results).write_text(json.dumps({"command": run.command, "rounds": found.rounds,
                                               "heldout": summaries}, indent=1) + "\n")
        run.log(f"results: {a.results}")


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(["python -m entropix_vllm.tune"] + list(sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    try:
        run = open_run(args, command)
        try:
            match, match_note = model_match(args.model_dir or run.client.model,
                                            args.model_dir is not None)
        except ModelIdError as e:
            raise TuneError(f"--model-dir {args.model_dir}: cannot identify the model: {e}")
        cal, per_req = calibrate(run)
        found = search(run, cal, per_req)
        summaries = heldout_report(run, cal, found.best)
        write_preset(run, cal, found, summaries, match, match_note, started,
                     time.perf_counter() - t_start)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _fmt_obj(o: Optional[float]) -> str:
    return "n/a" if o is None else f"{o:.3f}"


if __name__ == "__main__":
    sys.exit(main())
