"""The Entropix sampler for vLLM's V1 model runner (MRV1; the CPU build's runner).

vLLM internals read (``vllm_api.INTERNALS``, MRV1 section): ``Sampler.forward``
applies allowed-token ids, bad words, min-tokens, logit bias and penalties,
then calls ``sample(logits, sampling_metadata)`` and gathers logprobs for
whatever ``sample`` returns; the runner applies the grammar bitmask before
calling the sampler; its ``input_batch`` orders the rows; ``input_ids``,
``query_start_loc`` and ``optimistic_seq_lens_cpu`` describe the step.
0.33's fused ROCm path in ``forward`` (which would skip ``sample``) is off
while an Entropix sampler runs (``patches.apply_mrv1_fused_sample_guard``).

Only ``sample`` is replaced (``forward`` only marks the call), so every
processor vLLM applies before it and the logprob gathering after it are
vLLM's own: logprobs are those of the returned tokens. Per step, reading top
to bottom (:meth:`EntropixSamplerV1.sample`):

1. the rows' slots in the :class:`~.rows.RowTable` (:class:`~.rows.SlotMap`,
   updated only when the batch changes); a batch without Entropix rows goes
   to vLLM's own ``sample``;
2. Exp(1) noise (``RowTable.noise``: seeded rows from the request's own
   generator, vLLM's, nothing drawn for a sample the runner discards);
3. whether each row's previous generated token is its CoT token: the input
   token at the row's last scheduled position is the request's latest token
   (prompt or output; after preemption the recomputed prefill ends with it);
   it is a generated one when the sequence is longer than the prompt;
4. the attention figures of the same rows (``attention.py``);
5. :func:`entropix_vllm.step.entropix_step`;
6. rows without Entropix: vLLM's own ``sample`` on the same logits, with only
   their own generators, so their tokens are exactly the stock sampler's;
7. the trace (off the hot path), for Entropix rows whose sample is kept.

Discarded samples (a chunk of a prefill that is not the last one) never move
a request's generator: the Entropix step draws nothing for them, vLLM's own
sampling of them is undone by restoring the generators' states, and vLLM's
``set_offset`` rewind (which CPU generators refuse: a vLLM 0.32 CPU bug that
kills the engine) skips them (``patches.apply_mrv1_rewind_guard``). So a
seeded request neither crashes a CPU engine nor depends on how its prompt
was chunked, on any device.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .. import step as entropix_step_mod
from ..device import to_device
from . import attention, vllm_api
from .rows import RowTable, SlotMap, prev_is_cot
from .runtime import EntropixRuntime

Sampler = vllm_api.mrv1_sampler_base()

_SAMPLING = threading.local()   # set while an Entropix sampler's forward runs


def entropix_sampling() -> bool:
    """Whether an :class:`EntropixSamplerV1` is sampling on this thread."""
    return getattr(_SAMPLING, "active", False)


class EntropixSamplerV1(Sampler):
    """MRV1 ``Sampler`` with Entropix for the rows that use it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime: Optional[EntropixRuntime] = None
        self._runner_ref = None
        self.rows: Optional[RowTable] = None
        self.slots: Optional[SlotMap] = None

    def bind(self, runner, runtime: EntropixRuntime) -> None:
        """Attach the runner whose batches this sampler samples, and its table."""
        self._runner_ref = weakref.ref(runner)
        self.runtime = runtime
        self.rows = RowTable(runner.input_batch.max_num_reqs, runner.device)
        self.slots = SlotMap(self.rows)

    def forward(self, *args, **kwargs):
        _SAMPLING.active = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            _SAMPLING.active = False

    # -- one step ------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, sampling_metadata, logprobs_mode_override=None):
        runner = self._runner_ref() if self._runner_ref is not None else None
        num_rows = logits.shape[0]
        if runner is None or self.runtime is None or runner.input_batch.num_reqs != num_rows:
            # The profiling / warm-up dummy runs: no requests behind the rows.
            if self.runtime is not None:
                self.runtime.warm_up(logits)
            return super().sample(logits, sampling_metadata, logprobs_mode_override)
        discard = runner.discard_request_mask.np[:num_rows]
        saved = [(g, g.get_state()) for i, g in sampling_metadata.generators.items()
                 if i < num_rows and discard[i]]
        try:
            return self._sample_rows(runner, logits, sampling_metadata, logprobs_mode_override,
                                     discard)
        finally:
            for g, state in saved:   # discarded samples never move a generator
                g.set_state(state)

    def _sample_rows(self, runner, logits, sampling_metadata, logprobs_mode_override, discard):
        num_rows = logits.shape[0]
        try:
            self.slots.update(runner.input_batch.req_ids[:num_rows],
                              lambda rid, slot: self._fill(runner, rid, slot))
        except Exception as e:  # noqa: BLE001 - the rows' settings: vLLM samples them all
            self.runtime.faults.fault(e, num_rows)
            return super().sample(logits, sampling_metadata, logprobs_mode_override)
        enabled = self.slots.enabled_np
        if not enabled.any():
            return super().sample(logits, sampling_metadata, logprobs_mode_override)
        # A fault anywhere in the Entropix path must not take the engine down:
        # the step's rows are then sampled by vLLM's own sampler (seeded rows
        # from their generators as they were before the step).
        seeded = [(g, g.get_state()) for g in self.rows.seeded_rows(self.slots.slots_np)]
        try:
            out = self._entropix_rows(runner, logits, sampling_metadata, logprobs_mode_override,
                                      enabled, discard)
        except Exception as e:  # noqa: BLE001 - any fault falls back, logged
            for g, state in seeded:
                g.set_state(state)
            return self._fallback(runner, enabled, logits, sampling_metadata,
                                  logprobs_mode_override, e, discard)
        self.runtime.faults.ok()
        return out

    def _fill(self, runner, req_id: str, slot: int) -> None:
        """A request entering the batch: its settings and generator into ``slot``."""
        state = runner.requests[req_id]
        self.rows.put(slot, self.runtime.parse_row(state.sampling_params), state.generator)

    def _entropix_rows(self, runner, logits, sampling_metadata, logprobs_mode_override,
                       enabled, discard):
        num_rows = logits.shape[0]
        slots = self.slots
        noise = self.rows.noise(slots.slots_np, ~discard)
        self.runtime.faults.maybe_inject()
        coeff_table, cot, enabled_dev = self.rows.gather(slots.slots_dev)
        prev = self._prev_is_cot(runner, num_rows, cot)
        attn = attention.attention_stats_for_sampler(num_rows, logits.device)
        result = entropix_step_mod.entropix_step(logits, attn, coeff_table, cot, prev, noise)
        tokens = result.tokens
        processed = self._processed_logprobs(logits, sampling_metadata, logprobs_mode_override)

        if not enabled.all():
            own_generators = {i: g for i, g in sampling_metadata.generators.items()
                              if i < num_rows and not enabled[i]}
            stock_md = dataclasses.replace(sampling_metadata, generators=own_generators)
            stock, stock_processed = super().sample(logits, stock_md, logprobs_mode_override)
            tokens = torch.where(enabled_dev, tokens, stock.long())
            if processed is not None and stock_processed is not None:
                processed = torch.where(enabled_dev[:, None], processed, stock_processed)

        keep = enabled & ~discard
        self.runtime.trace_rows(slots.req_ids, self._output_index(runner, num_rows), keep,
                                entropix_step_mod.trace_tensors(result))
        return tokens, processed

    def _fallback(self, runner, enabled, logits, sampling_metadata, logprobs_mode_override, exc,
                  discard):
        self.runtime.faults.fault(exc, int(enabled.sum()))
        tokens, processed = super().sample(logits, sampling_metadata, logprobs_mode_override)
        try:
            keep = enabled & ~discard
            self.runtime.trace_fallback_rows(self.slots.req_ids,
                                             self._output_index(runner, logits.shape[0]), keep,
                                             tokens, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the trace never takes the step down
            pass
        return tokens, processed

    # -- pieces -----------------------------------------------------------------
    @staticmethod
    def _output_index(runner, num_rows: int) -> np.ndarray:
        """Each row's token index in its request's output (host)."""
        seq_lens = runner.optimistic_seq_lens_cpu[:num_rows].numpy()
        return seq_lens - runner.input_batch.num_prompt_tokens[:num_rows]

    @staticmethod
    def _prev_is_cot(runner, num_rows: int, cot_token: torch.Tensor) -> torch.Tensor:
        qsl = runner.query_start_loc.gpu[1:num_rows + 1].long()
        last_input = runner.input_ids.gpu[qsl - 1]
        seq_lens = runner.optimistic_seq_lens_cpu[:num_rows].numpy()
        generated = seq_lens > runner.input_batch.num_prompt_tokens[:num_rows]
        return prev_is_cot(last_input, to_device(torch.from_numpy(generated), cot_token.device),
                           cot_token)

    def _processed_logprobs(self, logits, sampling_metadata, override):
        """Processed logprobs/logits for Entropix rows: the masked logits at T = 1."""
        mode = override or self.logprobs_mode
        wanted = sampling_metadata.max_num_logprobs is not None or sampling_metadata.logprob_token_ids
        if not wanted:
            return None
        if mode == "processed_logits":
            return logits.clone()
        if mode == "processed_logprobs":
            return self.compute_logprobs(logits)
        return None
