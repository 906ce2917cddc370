"""Reading an Entropix trace file (the format: :mod:`entropix_vllm.trace`, which
writes it) and checking its branches against SPEC section 3.

:func:`read_trace` validates every line (:class:`TraceFormatError` names the
file and line); :func:`recompute_branches` gives SPEC section 3's branch of each
record from its traced entropy and varentropy (float64), for per-request or
shared thresholds. The report (``python -m entropix_vllm.report``), the eval
and the tests read traces through here.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Union

import torch

from ..config import EntropixConfig
from ..reference import BRANCH_NAMES, select_branch
from ..trace import RECORD_FIELDS

_THRESHOLDS = ("low_ent_thresh", "med_ent_thresh", "high_ent_thresh",
               "low_vent_thresh", "high_vent_thresh")


class TraceFormatError(ValueError):
    """A trace file line that is not a valid record; names the file and line."""

    def __init__(self, path: str, line_no: int, message: str):
        self.path, self.line_no = path, line_no
        super().__init__(f"{path}: line {line_no}: {message}")


def read_trace(path: str) -> list[dict]:
    """All records of a trace file, in file order. Blank lines are skipped.

    Raises FileNotFoundError for a missing file and :class:`TraceFormatError`
    (naming the 1-based line number) for a line that is not a JSON object with
    every key of :data:`RECORD_FIELDS`.
    """
    path = os.fspath(path)
    records = []
    with open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(path, line_no, f"not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise TraceFormatError(path, line_no, "not a JSON object")
            missing = [k for k in RECORD_FIELDS if k not in rec]
            if missing:
                raise TraceFormatError(path, line_no, f"missing keys {missing}")
            for key in ("entropy", "varentropy"):
                if isinstance(rec[key], bool) or not isinstance(rec[key], (int, float)):
                    raise TraceFormatError(path, line_no, f"{key} is not a number: {rec[key]!r}")
            if not isinstance(rec["branch"], str):
                raise TraceFormatError(path, line_no, f"branch is not a name: {rec['branch']!r}")
            records.append(rec)
    return records


ConfigSpec = Union[EntropixConfig, Mapping[str, EntropixConfig], None]


def recompute_branches(records: Sequence[Mapping], config: ConfigSpec = None,
                       default: Optional[EntropixConfig] = None) -> list[str]:
    """SPEC section 3's branch name for each record, from its traced entropy and
    varentropy, compared in float64 by :func:`reference.select_branch`.

    config: one :class:`EntropixConfig` for all records (None: the defaults),
            or a mapping ``request_id -> EntropixConfig`` for per-request
            thresholds; request ids missing from the mapping use ``default``
            (KeyError naming the id when ``default`` is None).
    """
    if not records:
        return []
    configs = [_config_for(rec, config, default) for rec in records]
    ent = torch.tensor([float(r["entropy"]) for r in records], dtype=torch.float64)
    vent = torch.tensor([float(r["varentropy"]) for r in records], dtype=torch.float64)
    codes = torch.empty(len(records), dtype=torch.int64)
    groups: dict[EntropixConfig, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(cfg, []).append(i)
    for cfg, rows in groups.items():
        idx = torch.tensor(rows, dtype=torch.int64)
        thresholds = {name: float(getattr(cfg, name)) for name in _THRESHOLDS}
        codes[idx] = select_branch(ent[idx], vent[idx], thresholds)
    return [BRANCH_NAMES[c] for c in codes.tolist()]


def _config_for(rec: Mapping, config: ConfigSpec, default: Optional[EntropixConfig]) -> EntropixConfig:
    if config is None:
        return EntropixConfig()
    if isinstance(config, EntropixConfig):
        return config
    rid = rec["request_id"]
    if rid in config:
        return config[rid]
    if default is None:
        raise KeyError(f"no EntropixConfig for request id {rid!r} and no default given")
    return default
