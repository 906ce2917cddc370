"""Accuracy intervals and paired differences.

The unit of sampling is the *item*: a sampler's score on item i is the mean of
its correctness over that item's samples (seeds; one value for a deterministic
sampler), and the accuracy is the mean of those per-item scores. Its 95%
interval is the normal one over items, ``mean +- z * sd / sqrt(n)`` with the
sample standard deviation (``ddof = 1``) of the per-item scores: seeds of one
item are correlated, so they are averaged within the item rather than counted
as independent draws (the clustered standard error of Miller 2024, "Adding
Error Bars to Evals"). The paired difference of two samplers on the same items
is the same interval over the per-item differences, which removes the
item-difficulty variance both share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    se: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "se": self.se, "n": self.n}

    def fmt(self, pct: bool = True, signed: bool = False) -> str:
        k = 100.0 if pct else 1.0
        s = "+" if signed else ""
        return f"{self.mean * k:{s}.1f} [{self.lo * k:{s}.1f}, {self.hi * k:{s}.1f}]"


def mean_interval(values: Sequence[float], z: float = Z95, clip: tuple = (None, None)) -> Interval:
    """Normal interval of the mean of ``values`` (per-item scores or differences).

    One value: a zero-width interval (no spread to estimate). ``clip`` bounds
    the ends (e.g. ``(0, 1)`` for an accuracy).
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        se = 0.0
    else:
        var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
        se = math.sqrt(var / n)
    lo, hi = mean - z * se, mean + z * se
    if clip[0] is not None:
        lo = max(lo, clip[0])
    if clip[1] is not None:
        hi = min(hi, clip[1])
    return Interval(mean, lo, hi, se, n)


def per_item_scores(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Per-item mean correctness of ``correct[item][sample]``."""
    out = []
    for row in correct:
        if not len(row):
            raise ValueError("an item without samples")
        out.append(sum(1.0 for c in row if c) / len(row))
    return out


def accuracy_interval(correct: Sequence[Sequence[bool]], z: float = Z95) -> Interval:
    """Accuracy over items and their samples, with its interval over items."""
    return mean_interval(per_item_scores(correct), z, clip=(0.0, 1.0))


def paired_difference(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]],
                      z: float = Z95) -> Interval:
    """Accuracy of ``a`` minus that of ``b`` on the same items (paired by item)."""
    if len(a) != len(b):
        raise ValueError(f"paired samplers must cover the same items ({len(a)} vs {len(b)})")
    sa, sb = per_item_scores(a), per_item_scores(b)
    return mean_interval([x - y for x, y in zip(sa, sb)], z, clip=(-1.0, 1.0))


def majority(answers: Sequence, correct: Sequence[bool]) -> bool:
    """Whether the majority answer of one vote group is correct.

    ``answers`` are the canonical answers of the samples (None: no answer
    found, which never wins a vote), ``correct`` their correctness. Among
    answers with the top count, the one that appears first in sample order
    wins; a group where no sample has an answer is wrong.
    """
    counts: dict = {}
    first: dict = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return False
    best = max(counts.values())
    winner = min((a for a, c in counts.items() if c == best), key=lambda a: first[a])
    return bool(correct[first[winner]])
