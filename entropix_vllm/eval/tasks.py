"""Task files and scorers of the eval.

A task file is JSON Lines, one item per line, in either form:

* the eval's own: ``{"messages": [...]}`` (chat) or ``{"prompt": "..."}``
  (completion), with ``"answer"`` and ``"scorer"`` (one of :data:`SCORERS`;
  ``--scorer`` supplies it for files without one). Optional: ``"id"``,
  ``"family"`` (a group for the per-family table; default: the id up to its
  first ``-``), ``"max_tokens"``, ``"stop"``. Other keys are kept as the item's
  metadata and reported back, never sent to the server.
* GSM8K's own (``{"question": ..., "answer": "... #### 72"}``): the question
  becomes one user turn, the answer is the number after ``####`` and the scorer
  is ``last-number-equals`` (GSM8K solutions end with their number).

Every scorer is an *extractor*: it maps an output to a canonical answer (or
None when it finds none), and an output is correct when that equals the
canonical form of the item's answer. Majority voting (``--vote``) votes on the
canonical answers, so ``"42"``, ``"42.0"`` and ``"4,2"``... are one vote only
where the scorer says they are one answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Canonical answer of an output that a ``contains`` / ``regex`` scorer accepts.
MATCH = "\x00match"


class TaskFileError(ValueError):
    """A task file or line that cannot be used; the message names file and line."""


# ----------------------------------------------------------------------------
# Extraction helpers
# ----------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")


def numbers(text: str) -> list[str]:
    """Canonical forms of the numbers in ``text``, in order (``1,000`` -> ``1000``,
    ``7.50`` -> ``7.5``, ``-0`` -> ``0``)."""
    out = []
    for m in _NUMBER.finditer(text):
        canon = canonical_number(m.group(0))
        if canon is not None:
            out.append(canon)
    return out


def canonical_number(text: str) -> Optional[str]:
    """``text`` as a number in canonical form, or None when it is not one."""
    t = str(text).strip().replace(",", "")
    if t.startswith("$"):
        t = t[1:]
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (for voting on free text)."""
    t = re.sub(r"[^\w\s]", " ", str(text).casefold())
    return " ".join(t.split())


_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-E])(?:\)|\.|:|,|\s*$)"),            # "B)", "(B)", "B.", "B"
    re.compile(r"\banswer\s*(?:is|:)?\s*\(?([A-E])\b(?!')"),      # "the answer is B"
    re.compile(r"(?:^|\s)\(?([A-E])\)"),                            # "... B) dog"
    re.compile(r"(?:^|\s)([A-E])(?=[\s.,:;!?]|$)"),                 # a standalone capital
)


def choice_letter(text: str) -> Optional[str]:
    """The option letter (A-E) an output picks, or None."""
    head = str(text)
    for pat in _LETTER_PATTERNS:
        m = pat.search(head)
        if m:
            return m.group(1)
    return None


# ----------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scorer:
    """``extract(output, answer)`` -> canonical answer of the output (or None);
    ``target(answer)`` -> canonical form of the item's answer."""

    name: str
    extract: Callable[[str, str], Optional[str]]
    target: Callable[[str], Optional[str]]
    doc: str

    def correct(self, output: str, answer: str) -> bool:
        got = self.extract(output, answer)
        return got is not None and got == self.target(answer)


def _first_number(out, ans):
    nums = numbers(out)
    return nums[0] if nums else None


def _last_number(out, ans):
    nums = numbers(out)
    return nums[-1] if nums else None


def _contains(out, ans):
    return MATCH if str(ans).casefold() in str(out).casefold() else (normalize_text(out) or None)


def _regex(out, ans):
    return MATCH if re.search(ans, str(out)) else (normalize_text(out) or None)


def _exact(out, ans):
    return str(out).strip()


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("first-number-equals", _first_number, canonical_number,
           "the first number of the output equals the answer (numerically: 1,000 = 1000.0)"),
    Scorer("last-number-equals", _last_number, canonical_number,
           "the last number of the output equals the answer (numerically)"),
    Scorer("exact", _exact, lambda a: str(a).strip(),
           "the output, stripped of surrounding whitespace, equals the answer"),
    Scorer("contains", _contains, lambda a: MATCH,
           "the output contains the answer, ignoring case"),
    Scorer("regex", _regex, lambda a: MATCH,
           "the answer is a Python regular expression found in the output (re.search)"),
    Scorer("multiple-choice", lambda out, ans: choice_letter(out),
           lambda a: str(a).strip().upper(),
           "the option letter the output picks (\"B\", \"B)\", \"(B)\", \"the answer is B\") "
           "equals the answer letter"),
)}


def get_scorer(name: str, where: str = "scorer") -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise TaskFileError(f"{where}: unknown scorer {name!r}; known scorers: "
                            + ", ".join(SCORERS)) from None


# ----------------------------------------------------------------------------
# Items
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    id: str
    answer: str
    scorer: str
    family: str
    messages: Optional[tuple] = None      # chat form
    prompt: Optional[str] = None          # completion form
    max_tokens: Optional[int] = None
    stop: Optional[tuple] = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def question(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return self.messages[-1].get("content", "") if self.messages else ""

    def is_correct(self, output: str) -> bool:
        return SCORERS[self.scorer].correct(output, self.answer)

    def extract(self, output: str) -> Optional[str]:
        return SCORERS[self.scorer].extract(output, self.answer)


_OWN_KEYS = {"id", "messages", "prompt", "answer", "scorer", "family", "max_tokens", "stop"}
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def _check_messages(msgs, where):
    if not isinstance(msgs, list) or not msgs:
        raise TaskFileError(f"{where}: 'messages' must be a non-empty list of chat turns")
    for turn in msgs:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise TaskFileError(f"{where}: every turn of 'messages' needs a string 'role' and "
                                f"'content', got {turn!r}")
    return tuple(dict(t) for t in msgs)


def parse_item(obj: Any, where: str, default_id: str, default_scorer: Optional[str] = None) -> Item:
    """One task-file object as an :class:`Item` (``where`` names it in errors)."""
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "question" in obj and "messages" not in obj and "prompt" not in obj:  # GSM8K
        if not isinstance(obj["question"], str) or not isinstance(obj.get("answer"), str):
            raise TaskFileError(f"{where}: a GSM8K item needs string 'question' and 'answer'")
        m = _GSM8K_ANSWER.search(obj["answer"])
        if not m:
            raise TaskFileError(f"{where}: a GSM8K answer must end with '#### <number>'")
        target = canonical_number(m.group(1))
        if target is None:
            raise TaskFileError(f"{where}: the GSM8K answer after '####' is not a number: "
                                f"{m.group(1)!r}")
        meta = {k: v for k, v in obj.items() if k not in ("question", "answer")}
        return Item(id=str(obj.get("id", default_id)), answer=target,
                    scorer=default_scorer or "last-number-equals",
                    family=str(obj.get("family", "gsm8k")),
                    messages=({"role": "user", "content": obj["question"]},), meta=meta)
    has_m, has_p = "messages" in obj, "prompt" in obj
    if has_m == has_p:
        raise TaskFileError(f"{where}: an item needs exactly one of 'messages' (chat) or "
                            "'prompt' (completion), or GSM8K's 'question'")
    if "answer" not in obj or isinstance(obj["answer"], (dict, list, bool)) or obj["answer"] is None:
        raise TaskFileError(f"{where}: 'answer' must be a string or a number")
    answer = str(obj["answer"])
    scorer = obj.get("scorer", default_scorer)
    if scorer is None:
        raise TaskFileError(f"{where}: no 'scorer' (give it per item or with --scorer); "
                            "known scorers: " + ", ".join(SCORERS))
    if not isinstance(scorer, str):
        raise TaskFileError(f"{where}: 'scorer' must be a string, got {scorer!r}")
    get_scorer(scorer, f"{where}: scorer")
    if SCORERS[scorer].target(answer) is None:
        raise TaskFileError(f"{where}: answer {answer!r} is not a number, as scorer "
                            f"{scorer!r} needs")
    if scorer == "regex":
        try:
            re.compile(answer)
        except re.error as e:
            raise TaskFileError(f"{where}: answer is not a valid regular expression: {e}") from None
    item_id = str(obj.get("id", default_id))
    family = obj.get("family")
    if family is None:
        family = item_id.split("-", 1)[0] if "-" in item_id else "all"
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise TaskFileError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise TaskFileError(f"{where}: 'stop' must be a string or a list of strings")
        stop = tuple(stop)
    if has_p and not isinstance(obj["prompt"], str):
        raise TaskFileError(f"{where}: 'prompt' must be a string")
    return Item(id=item_id, answer=answer, scorer=scorer, family=str(family),
                messages=_check_messages(obj["messages"], where) if has_m else None,
                prompt=obj["prompt"] if has_p else None, max_tokens=max_tokens, stop=stop,
                meta={k: v for k, v in obj.items() if k not in _OWN_KEYS})


def resolve_task_path(spec: str) -> Path:
    """A task file path, or the name of a shipped file (``dev``, ``heldout``, ``tiny``)."""
    p = Path(spec)
    if p.exists():
        return p
    shipped = DATA_DIR / f"{spec}.jsonl"
    if "/" not in spec and shipped.exists():
        return shipped
    names = sorted(f.stem for f in DATA_DIR.glob("*.jsonl"))
    raise TaskFileError(f"--tasks {spec}: no such file, and not a shipped task file "
                        f"({', '.join(names)})")


def load_tasks(specs: Sequence[str], default_scorer: Optional[str] = None,
               limit: Optional[int] = None) -> list[Item]:
    """Items of the task files ``specs`` in order; ids must be unique."""
    if default_scorer is not None:
        get_scorer(default_scorer, "--scorer")
    items: list[Item] = []
    for spec in specs:
        path = resolve_task_path(spec)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskFileError(f"{where}: not valid JSON ({e.msg})") from None
                items.append(parse_item(obj, where, f"{path.stem}-{n}", default_scorer))
    if not items:
        raise TaskFileError("no items in " + ", ".join(specs))
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if it.id in seen:
            raise TaskFileError(f"item id {it.id!r} appears twice (items {seen[it.id] + 1} and "
                                f"{i + 1}); ids must be unique across the task files")
        seen[it.id] = i
    return items[:limit] if limit else items
