"""The per-request Entropix state of a model runner, one owner for both runners.

Both samplers (``mrv1.py``, ``mrv2.py``) keep their requests' settings in a
:class:`RowTable`: one slot per request the runner holds, host tables
(numpy) and their device copies, refreshed in one non-blocking copy per
table when a request arrives. A step addresses slots through a ``[B]``
row-to-slot index (MRV2: vLLM's ``idx_mapping``; MRV1: :class:`SlotMap` over
the input batch's request ids), gathers the rows' coefficient table, CoT
tokens and Entropix flags on the device (:meth:`RowTable.gather`), and draws
the rows' noise with one policy (:meth:`RowTable.noise`):

* a seeded request owns a ``torch.Generator`` seeded with its seed (MRV1:
  vLLM's own per-request generator; MRV2: one made here, on the device, as
  vLLM's MRV1 makes it) and draws exactly ``n_draws x K`` Exp(1) values from
  it per sample that produces a token, nothing for a sample the runner
  discards (a chunk of a prefill that is not the last one): so the same
  seeded request gives the same tokens under both runners, in any batch,
  however its prompt is chunked;
* every other row takes its noise from the device's default generator, in
  one call for the whole batch.

Nothing here synchronises with the device: host decisions read the numpy
tables only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..contract import K_MAX
from ..device import copy_to_device, to_device
from ..config import COEFF_NAMES


@dataclass
class RowConfig:
    """One request's effective Entropix settings."""

    enabled: bool
    coeffs: list          # values in config.COEFF_NAMES order
    cot_token: int        # -1: none
    n_draws: int          # noise depth this request consumes per step


def seeded_generator(seed: int, device) -> torch.Generator:
    """The generator of a seeded request, made as vLLM's MRV1 runner makes it."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class RowTable:
    """Per-slot settings of the requests a runner holds (``capacity`` slots)."""

    def __init__(self, capacity: int, device):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        n, c = self.capacity, len(COEFF_NAMES)
        self.enabled = np.zeros(n, dtype=bool)
        self.n_draws = np.ones(n, dtype=np.int64)
        self.coeffs = np.zeros((n, c), dtype=np.float64)
        self.cot = np.full(n, -1, dtype=np.int64)
        self.generators: List[Optional[torch.Generator]] = [None] * n
        self.enabled_dev = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.coeffs_dev = torch.zeros(n, c, dtype=torch.float64, device=self.device)
        self.cot_dev = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self._dirty = False

    def put(self, slot: int, row: Optional[RowConfig],
            generator: Optional[torch.Generator] = None) -> None:
        """The request in ``slot`` (None: a request without Entropix settings)."""
        on = row is not None and row.enabled
        self.enabled[slot] = on
        self.generators[slot] = generator if on else None
        if on:
            self.coeffs[slot] = row.coeffs
            self.cot[slot] = row.cot_token
            self.n_draws[slot] = max(1, int(row.n_draws))
        self._dirty = True

    def flush(self) -> None:
        """Host tables -> device copies (non-blocking), if a slot changed."""
        if not self._dirty:
            return
        copy_to_device(self.enabled_dev, torch.from_numpy(self.enabled))
        copy_to_device(self.coeffs_dev, torch.from_numpy(self.coeffs))
        copy_to_device(self.cot_dev, torch.from_numpy(self.cot))
        self._dirty = False

    def gather(self, slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(coeff_table [B, C] float64, cot [B] int64, enabled [B] bool)`` of
        the rows whose slots are ``slots`` (a ``[B]`` device index)."""
        slots = slots.long()
        return (self.coeffs_dev.index_select(0, slots), self.cot_dev.index_select(0, slots),
                self.enabled_dev.index_select(0, slots))

    def noise(self, slots_np: np.ndarray, draws_np: np.ndarray,
              num_candidates: int = K_MAX) -> torch.Tensor:
        """Exp(1) noise ``[B, N, num_candidates]`` for one step (the policy above).

        ``slots_np``: the rows' slots (host); ``draws_np``: ``[B]`` bool, the
        rows whose sample produces a token (only those draw from a seeded
        request's generator). ``N`` is the deepest ``n_draws`` of the
        batch's Entropix rows.
        """
        slots_np = np.asarray(slots_np)
        B = len(slots_np)
        enabled = self.enabled[slots_np]
        depth = self.n_draws[slots_np]
        N = int(depth[enabled].max()) if enabled.any() else 1
        out = torch.empty(B, N, num_candidates, device=self.device).exponential_()
        for i in np.nonzero(enabled & np.asarray(draws_np, dtype=bool))[0]:
            g = self.generators[slots_np[i]]
            if g is not None:
                out[i, :depth[i]].exponential_(generator=g)
        return out

    def seeded_rows(self, slots_np: np.ndarray) -> Iterable[torch.Generator]:
        """The generators of the Entropix rows ``slots_np`` that have one."""
        for s in np.asarray(slots_np):
            if self.enabled[s] and self.generators[s] is not None:
                yield self.generators[s]


class SlotMap:
    """MRV1's rows -> slots: a slot per request id in the input batch.

    :meth:`update` takes the step's request ids (row order); requests that left
    the batch free their slot, new ones get one and their settings
    (``fill(req_id, slot)``); the row-to-slot index goes to the device once
    per change of the batch.
    """

    def __init__(self, table: RowTable):
        self.table = table
        self.slot_of: dict = {}
        self._free = list(range(table.capacity - 1, -1, -1))
        self.req_ids: tuple = ()
        self.slots_np = np.zeros(0, dtype=np.int64)
        self.slots_dev = torch.zeros(0, dtype=torch.int64, device=table.device)
        self.enabled_np = np.zeros(0, dtype=bool)

    def update(self, req_ids: Sequence[str], fill: Callable[[str, int], None]) -> bool:
        """Bring the map to ``req_ids``; True when the batch changed."""
        key = tuple(req_ids)
        if key == self.req_ids:
            return False
        live = set(key)
        for rid in [r for r in self.slot_of if r not in live]:
            slot = self.slot_of.pop(rid)
            self.table.put(slot, None)
            self._free.append(slot)
        for rid in key:
            if rid not in self.slot_of:
                slot = self._free.pop()
                self.slot_of[rid] = slot
                fill(rid, slot)
        self.table.flush()
        self.req_ids = key
        self.slots_np = np.fromiter((self.slot_of[r] for r in key), dtype=np.int64,
                                    count=len(key))
        self.slots_dev = to_device(torch.from_numpy(self.slots_np), self.table.device)
        self.enabled_np = self.table.enabled[self.slots_np]
        return True


def prev_is_cot(last_input: torch.Tensor, generated: torch.Tensor,
                cot: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the row's previous token was generated (past the prompt)
    and is its CoT token (what the step needs to not insert it twice)."""
    return generated & (last_input.long() == cot)
