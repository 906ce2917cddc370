"""From samples to the eval's figures: accuracy, maj@K, pass@K, paired
differences, tokens, speed, how often a token is not the argmax, and the
Entropix branch mix of the server's trace."""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from ..reference import BRANCH_NAMES
from .runner import SamplerRun, iter_samples
from .stats import accuracy_interval, majority, mean_interval, paired_difference
from .tasks import Item

#: Branches that draw their token at random (the insert branch emits a fixed token
#: unless it falls back to a draw; the trace does not say which, so it is not counted).
SAMPLED_BRANCHES = ("explore", "resample", "adaptive")


def correctness(run: SamplerRun, items: Sequence[Item]) -> list:
    """``[item][group][vote]`` booleans (a failed request counts as wrong)."""
    return [[[s.error is None and items[i].is_correct(s.text) for s in group]
             for group in per_item] for i, per_item in enumerate(run.samples)]


def flat(correct) -> list:
    """``[item][sample]`` with the groups of every item concatenated."""
    return [[c for group in per_item for c in group] for per_item in correct]


def vote_scores(run: SamplerRun, items: Sequence[Item], correct) -> tuple[list, list]:
    """Per item and group: (majority correct, any correct)."""
    maj, anyc = [], []
    for i, per_item in enumerate(run.samples):
        m_row, a_row = [], []
        for g, group in enumerate(per_item):
            answers = [None if s.error else items[i].extract(s.text) for s in group]
            m_row.append(majority(answers, correct[i][g]))
            a_row.append(any(correct[i][g]))
        maj.append(m_row)
        anyc.append(a_row)
    return maj, anyc


def branch_mix(trace: Sequence[dict]) -> dict:
    counts = Counter(str(r.get("branch")) for r in trace)
    total = sum(counts.values())
    mix = {b: counts.get(b, 0) / total for b in BRANCH_NAMES} if total else {}
    for b, c in counts.items():
        if b not in mix and total:
            mix[b] = c / total
    sampled = sum(counts.get(b, 0) for b in SAMPLED_BRANCHES) / total if total else None
    return {"tokens": total, "mix": mix, "sampled_share": sampled}


def summarize(run: SamplerRun, items: Sequence[Item], vote: int,
              baseline: Optional[SamplerRun] = None) -> dict:
    """Every figure of one sampler's run (JSON-ready)."""
    corr = correctness(run, items)
    acc = accuracy_interval(flat(corr))
    samples = list(iter_samples(run))
    tokens = sum(s.completion_tokens for s in samples)
    off = [s for s in samples if s.off_argmax is not None]
    out = {
        "sampler": run.sampler.as_dict(),
        "samples": len(samples),
        "errors": sum(1 for s in samples if s.error),
        "accuracy": acc.as_dict(),
        "mean_output_tokens": tokens / len(samples) if samples else 0.0,
        "tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else None,
        "wall_s": run.wall_s,
        "off_argmax_share": (sum(s.off_argmax for s in off) / sum(s.scored_tokens for s in off)
                             if off and sum(s.scored_tokens for s in off) else None),
        "truncated_share": sum(1 for s in samples if s.finish_reason == "length") / len(samples)
        if samples else 0.0,
    }
    if vote > 1:
        maj, anyc = vote_scores(run, items, corr)
        out["maj"] = accuracy_interval(maj).as_dict()
        out["pass"] = accuracy_interval(anyc).as_dict()
    if baseline is not None and baseline is not run:
        bcorr = correctness(baseline, items)
        out["vs_baseline"] = {"baseline": baseline.sampler.name,
                              "accuracy": paired_difference(flat(corr), flat(bcorr)).as_dict()}
        if vote > 1:
            bmaj, _ = vote_scores(baseline, items, bcorr)
            out["vs_baseline"]["maj"] = paired_difference(maj, bmaj).as_dict()
    if run.sampler.entropix:
        out["branches"] = branch_mix(run.trace)
    fams: dict = {}
    for i, it in enumerate(items):
        fams.setdefault(it.family, []).append(i)
    out["families"] = {f: accuracy_interval([flat(corr)[i] for i in idx]).as_dict()
                       for f, idx in fams.items()}
    return out


def per_item_rows(run: SamplerRun, items: Sequence[Item]) -> list:
    """The samples of a run, for the results file."""
    rows = []
    for i, per_item in enumerate(run.samples):
        for group in per_item:
            for s in group:
                rows.append({"item": items[i].id, "group": s.group, "vote": s.vote,
                             "seed": s.seed, "text": s.text, "correct": s.error is None
                             and items[i].is_correct(s.text), "answer": items[i].extract(s.text)
                             if s.error is None else None, "tokens": s.completion_tokens,
                             "finish_reason": s.finish_reason, "off_argmax": s.off_argmax,
                             "error": s.error, "response_id": s.response_id})
    return rows


def ci_from(d: dict):
    from .stats import Interval
    return Interval(d["mean"], d["lo"], d["hi"], d["se"], d["n"])


__all__ = ["summarize", "per_item_rows", "branch_mix", "correctness", "flat", "vote_scores",
           "mean_interval", "ci_from"]
