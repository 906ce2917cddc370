"""Summarise an Entropix trace file (format: :mod:`entropix_vllm.trace`; read by
:mod:`entropix_vllm.report.reader`).

Usage::

    python -m entropix_vllm.report TRACE [--plot out.png] [--preset NAME|FILE] [--set name=value ...]

Prints the number of requests and tokens, a table of branch counts, their
percentages and per-branch mean entropy (bits) / varentropy (bits^2) for all
five branches, and how many traced branches disagree with SPEC section 3
recomputed in float64 from the traced entropy/varentropy. The thresholds are
the :class:`EntropixConfig` defaults (``classic``), or those of ``--preset``
(a built-in preset name or a preset file: the preset the server used),
overridden by ``--set low_ent_thresh=0.2`` style flags (any coefficient name;
validated by ``EntropixConfig.replace``).

``--plot out.png`` draws the entropy-varentropy plane (matplotlib, Agg backend):
one colour per branch, the threshold lines, a symlog varentropy axis.

Exit codes: 0 success; 2 bad arguments, or a missing, empty or malformed trace.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from typing import Optional, Sequence

from ..config import (EntropixConfig, EntropixConfigError, builtin_presets, load_preset_file,
                     looks_like_path)
from ..reference import BRANCH_NAMES
from .reader import TraceFormatError, read_trace, recompute_branches

# One colour per branch (matplotlib's tab10), in BRANCH_NAMES order.
BRANCH_COLOURS = ("#1f77b4", "#9467bd", "#2ca02c", "#d62728", "#ff7f0e")


class ReportError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit code 2."""


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------
def preset_config(value: Optional[str]) -> EntropixConfig:
    """The coefficients of ``--preset`` (a built-in name or a preset file; None: classic)."""
    if value is None:
        return EntropixConfig()
    known = builtin_presets()
    try:
        if value in known:
            return known[value].config()
        if looks_like_path(value) or os.path.exists(value):
            return load_preset_file(value, "--preset").config()
    except EntropixConfigError as e:
        raise ReportError(str(e)) from None
    raise ReportError(f"--preset: unknown preset {value!r}; built-in presets are "
                      f"{', '.join(known)}, or give the path of a preset JSON file")


def parse_overrides(items: Sequence[str], base: Optional[EntropixConfig] = None) -> EntropixConfig:
    """``["name=value", ...]`` applied to ``base`` (default: the defaults; validated)."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ReportError(f"--set expects name=value, got {item!r}")
        overrides[name.strip()] = value
    try:
        return (base or EntropixConfig()).replace(overrides)
    except EntropixConfigError as e:
        raise ReportError(f"--set {e}") from None


def summarise(records: Sequence[dict], config: EntropixConfig) -> dict:
    """Counts and means per branch, plus the disagreements with the recomputation.

    Returns ``{"tokens", "requests", "branches": {name: {"count", "percent",
    "mean_entropy", "mean_varentropy"}}, "other": Counter of unknown names,
    "disagreements": [(record, recomputed_name), ...]}``.
    """
    n = len(records)
    branches = {}
    for name in BRANCH_NAMES:
        rows = [r for r in records if r["branch"] == name]
        branches[name] = {
            "count": len(rows),
            "percent": 100.0 * len(rows) / n if n else 0.0,
            "mean_entropy": _mean(r["entropy"] for r in rows),
            "mean_varentropy": _mean(r["varentropy"] for r in rows),
        }
    other = Counter(r["branch"] for r in records if r["branch"] not in BRANCH_NAMES)
    recomputed = recompute_branches(records, config)
    disagreements = [(r, b) for r, b in zip(records, recomputed)
                     if r["branch"] != b and r["branch"] != "fallback"]
    return {"tokens": n, "requests": len({r["request_id"] for r in records}),
            "branches": branches, "other": other, "disagreements": disagreements}


def _mean(values) -> float:
    vals = [float(v) for v in values]
    return math.fsum(vals) / len(vals) if vals else math.nan


def format_summary(path: str, summary: dict, config: EntropixConfig) -> str:
    """The printed report (plain text)."""
    out = [f"trace: {path}",
           f"requests: {summary['requests']}",
           f"tokens: {summary['tokens']}",
           "",
           f"{'branch':<12}{'tokens':>10}{'percent':>10}{'mean entropy':>15}{'mean varentropy':>18}"]
    for name, b in summary["branches"].items():
        ment = "-" if b["count"] == 0 else f"{b['mean_entropy']:.4f}"
        mvent = "-" if b["count"] == 0 else f"{b['mean_varentropy']:.4f}"
        out.append(f"{name:<12}{b['count']:>10}{b['percent']:>9.2f}%{ment:>15}{mvent:>18}")
    for name, count in sorted(summary["other"].items()):
        out.append(f"{name:<12}{count:>10}{100.0 * count / summary['tokens']:>9.2f}%"
                   "   (not a known branch)")
    out.append("")
    thr = ", ".join(f"{k}={getattr(config, k):g}" for k in
                    ("low_ent_thresh", "med_ent_thresh", "high_ent_thresh",
                     "low_vent_thresh", "high_vent_thresh"))
    dis = summary["disagreements"]
    out.append(f"thresholds: {thr}")
    out.append(f"disagreements with the recomputed branch: {len(dis)}")
    for rec, want in dis[:5]:
        out.append(f"  request {rec['request_id']!r} index {rec['index']}: traced {rec['branch']}, "
                   f"recomputed {want} (entropy {rec['entropy']!r}, varentropy {rec['varentropy']!r})")
    if len(dis) > 5:
        out.append(f"  ... and {len(dis) - 5} more")
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------
def plot(records: Sequence[dict], config: EntropixConfig, out_path: str, title: str) -> None:
    """Scatter of the entropy (x, bits) - varentropy (y, bits^2) plane as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ReportError(f"--plot needs matplotlib, which cannot be imported ({e}); "
                          "install it with `pip install matplotlib`") from None

    fig, ax = plt.subplots(figsize=(10.5, 6.5))
    x_max, y_min, y_max = config.high_ent_thresh, 0.0, config.high_vent_thresh
    for name, colour in zip(BRANCH_NAMES, BRANCH_COLOURS):
        pts = [(float(r["entropy"]), float(r["varentropy"])) for r in records
               if r["branch"] == name]
        pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        x_max = max([x_max] + [p[0] for p in pts])
        y_min = min([y_min] + [p[1] for p in pts])
        y_max = max([y_max] + [p[1] for p in pts])
        count = sum(1 for r in records if r["branch"] == name)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.6, color=colour,
                   label=f"{name} ({count})", rasterized=len(pts) > 5000)

    ent_lines = (("low_ent_thresh", ":"), ("med_ent_thresh", "--"), ("high_ent_thresh", "-."))
    vent_lines = (("low_vent_thresh", ":"), ("high_vent_thresh", "-."))
    for key, style in ent_lines:
        x = getattr(config, key)
        ax.axvline(x, color="0.3", linestyle=style, linewidth=1)
        ax.annotate(f"{key}={x:g}", xy=(x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", rotation=90,
                    va="top", ha="left", fontsize=8, color="0.3")
    for key, style in vent_lines:
        y = getattr(config, key)
        ax.axhline(y, color="0.3", linestyle=style, linewidth=1)
        ax.annotate(f"{key}={y:g}", xy=(1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(-3, 3), textcoords="offset points",
                    va="bottom", ha="right", fontsize=8, color="0.3")

    # Varentropy spans ~1e-6..50 and can be exactly 0: symlog, linear below 1e-6.
    ax.set_yscale("symlog", linthresh=1e-6, linscale=0.5)
    ax.set_xlim(0, 1.05 * x_max)
    ax.set_ylim(y_min - 1e-6, 3.0 * y_max)
    ax.set_xlabel("entropy (bits)")
    ax.set_ylabel("varentropy (bits$^2$, symlog)")
    ax.set_title(f"{title}: {len(records)} tokens")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="branch (tokens)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ReportError(f"trace file not found: {path}")
    if os.path.isdir(path):
        raise ReportError(f"trace path is a directory, not a file: {path}")
    try:
        records = read_trace(path)
    except TraceFormatError as e:
        raise ReportError(f"malformed trace: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read trace file {path}: {e}") from None
    if not records:
        raise ReportError(f"trace file is empty (no records): {path}")
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m entropix_vllm.report",
        description="Summarise an Entropix per-token trace (JSON Lines).")
    parser.add_argument("trace", help="trace file written by the Entropix sampler")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="write the entropy-varentropy scatter plot to this PNG file")
    parser.add_argument("--preset", default=None, metavar="NAME|FILE",
                        help="the preset the server used (a built-in name or a preset file): "
                             "its coefficients for the recomputation and the plot "
                             "(default: classic, SPEC section 3's defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="override an EntropixConfig coefficient for the recomputation "
                             "and the plot (repeatable), e.g. --set low_ent_thresh=0.2")
    args = parser.parse_args(argv)
    try:
        config = parse_overrides(args.overrides, preset_config(args.preset))
        records = _load(args.trace)
        summary = summarise(records, config)
        print(format_summary(args.trace, summary, config))
        if args.plot:
            try:
                plot(records, config, args.plot, os.path.basename(args.trace))
            except OSError as e:
                raise ReportError(f"cannot write the plot {args.plot}: {e}") from None
            print(f"plot written to {args.plot}")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

