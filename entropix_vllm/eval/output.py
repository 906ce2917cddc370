"""The eval's outputs: the table, the JSON results file and the PNG."""

from __future__ import annotations

import json
from typing import Optional, Sequence

from .metrics import ci_from


def _pct(d: Optional[dict], signed: bool = False) -> str:
    return ci_from(d).fmt(signed=signed) if d else "-"


def _share(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(summaries: Sequence[dict], vote: int) -> str:
    """A Markdown table, one row per sampler."""
    head = ["sampler", "accuracy % [95% CI]"]
    base = next((s["vs_baseline"]["baseline"] for s in summaries if "vs_baseline" in s), None)
    if base:
        head.append(f"vs {base} (pp) [95% CI]")
    if vote > 1:
        head += [f"maj@{vote} %", f"pass@{vote} %"]
        if base:
            head.append(f"maj@{vote} vs {base} (pp)")
    head += ["out tokens", "tok/s", "not argmax", "sampled branch", "branch mix"]
    rows = []
    for s in summaries:
        row = [s["sampler"]["name"], _pct(s["accuracy"])]
        vb = s.get("vs_baseline")
        if base:
            row.append(_pct(vb["accuracy"], signed=True) if vb else "(baseline)")
        if vote > 1:
            row += [_pct(s.get("maj")), _pct(s.get("pass"))]
            if base:
                row.append(_pct(vb.get("maj"), signed=True) if vb and vb.get("maj") else
                           ("(baseline)" if not vb else "-"))
        br = s.get("branches")
        mix = "-"
        if br and br["tokens"]:
            mix = " ".join(f"{k[:3]} {100 * v:.0f}" for k, v in br["mix"].items() if v)
        row += [f"{s['mean_output_tokens']:.1f}",
                "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.0f}",
                _share(s["off_argmax_share"]),
                _share(br["sampled_share"]) if br else "-", mix]
        if s["errors"]:
            row[0] += f" ({s['errors']} failed requests)"
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def family_table(summaries: Sequence[dict]) -> str:
    fams = list(summaries[0]["families"]) if summaries else []
    head = ["family"] + [s["sampler"]["name"] for s in summaries]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for f in fams:
        n = summaries[0]["families"][f]["n"]
        lines.append("| " + " | ".join([f"{f} ({n})"] + [
            f"{100 * s['families'][f]['mean']:.1f}" for s in summaries]) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False, allow_nan=True)
        f.write("\n")


def plot(path: str, summaries: Sequence[dict], vote: int, title: str = "") -> None:
    """Accuracy (and maj@K) per sampler with 95% interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["sampler"]["name"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4.2), dpi=120)
    width = 0.38 if vote > 1 else 0.6
    xs = list(range(len(names)))
    series = [("accuracy", "single sample", -width / 2 if vote > 1 else 0.0)]
    if vote > 1:
        series.append(("maj", f"maj@{vote}", width / 2))
    for key, label, dx in series:
        means = [100 * s[key]["mean"] for s in summaries]
        lo = [100 * (s[key]["mean"] - s[key]["lo"]) for s in summaries]
        hi = [100 * (s[key]["hi"] - s[key]["mean"]) for s in summaries]
        ax.bar([x + dx for x in xs], means, width, yerr=[lo, hi], capsize=4, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%), 95% interval over items")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
