"""The Entropix sampler for vLLM's V1 model runner (MRV1; the CPU build's runner).

vLLM internals read (``vllm_api.INTERNALS``, MRV1 section): ``Sampler.forward``
applies allowed-token ids, bad words, min-tokens, logit bias and penalties,
then calls ``sample(logits, sampling_metadata)`` and gathers logprobs for
whatever ``sample`` returns; the runner applies the grammar bitmask before
calling the sampler; its ``input_batch`` orders the rows; ``input_ids``,
``query_start_loc`` and ``optimistic_seq_lens_cpu`` describe the step.
0.33's fused ROCm path in ``forward`` (which would skip ``sample``) is off
while an Entropix sampler runs (``vllm_api.guard_mrv1_fused_sample``).

Only ``sample`` is replaced (``forward`` only marks the call), so every
processor vLLM applies before it and the logprob gathering after it are
vLLM's own: logprobs are those of the returned tokens. Per step, reading top
to bottom:

1. the rows' settings (:meth:`EntropixRuntime.batch`; cached while the batch
   is unchanged); a batch without Entropix rows goes to vLLM's own ``sample``;
2. Exp(1) noise, seeded rows from their own generator;
3. whether each row's previous generated token is its CoT token: the input
   token at the row's last scheduled position is the request's latest token
   (prompt or output; after preemption the recomputed prefill ends with it);
   it is a generated one when the sequence is longer than the prompt;
4. the attention figures of the same rows (``attention.py``);
5. :func:`entropix_vllm.step.entropix_step`;
6. rows without Entropix: vLLM's own ``sample`` on the same logits, with only
   their own generators, so their tokens are exactly the stock sampler's;
7. the trace (off the hot path), for Entropix rows whose sample is kept.

CPU generators: for a request whose chunked prefill is not finished, vLLM
samples a token it then discards and rewinds the request's generator with
``set_offset``, which CPU generators do not support: the engine dies (a vLLM
0.32 CPU bug, stock sampler included). On CPU the Entropix engine instead
restores those generators' states after sampling and hides them from the
rewind (:func:`guard_cpu_generator_rewind`), so a seeded request neither
crashes the engine nor depends on how its prompt was chunked.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .. import step as entropix_step_mod
from ..config import K_MAX
from . import attention, vllm_api
from ..device import to_device
from .runtime import EntropixRuntime, batch_noise

_SAMPLER_CLS = None
_SAMPLING = threading.local()   # set while an Entropix sampler's forward runs


def _entropix_sampling() -> bool:
    return getattr(_SAMPLING, "active", False)


def sampler_class():
    """``EntropixSamplerV1``, built on first use from vLLM's MRV1 ``Sampler``."""
    global _SAMPLER_CLS
    if _SAMPLER_CLS is None:
        _SAMPLER_CLS = _make_sampler_class(vllm_api.mrv1_sampler_base())
        vllm_api.guard_mrv1_fused_sample(_entropix_sampling)
    return _SAMPLER_CLS


def __getattr__(name: str):
    if name == "EntropixSamplerV1":
        return sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_sampler_class(Sampler):
    class EntropixSamplerV1(Sampler):
        """MRV1 ``Sampler`` with Entropix for the rows that use it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.runtime: Optional[EntropixRuntime] = None
            self._runner_ref = None

        def bind(self, runner, runtime: EntropixRuntime) -> None:
            """Attach the runner whose batches this sampler samples."""
            self._runner_ref = weakref.ref(runner)
            self.runtime = runtime

        def forward(self, *args, **kwargs):
            _SAMPLING.active = True
            try:
                return super().forward(*args, **kwargs)
            finally:
                _SAMPLING.active = False

        def sample(self, logits: torch.Tensor, sampling_metadata, logprobs_mode_override=None):
            runner = self._runner_ref() if self._runner_ref is not None else None
            num_rows = logits.shape[0]
            if runner is None or self.runtime is None or runner.input_batch.num_reqs != num_rows:
                # The profiling / warm-up dummy runs: no requests behind the rows.
                return super().sample(logits, sampling_metadata, logprobs_mode_override)
            saved = self._save_discarded_generators(runner, sampling_metadata, num_rows, logits)
            try:
                return self._sample_rows(runner, logits, sampling_metadata, logprobs_mode_override)
            finally:
                for g, state in saved:
                    g.set_state(state)

        def _sample_rows(self, runner, logits, sampling_metadata, logprobs_mode_override):
            num_rows = logits.shape[0]
            try:
                batch = self.runtime.batch(runner.input_batch.req_ids[:num_rows],
                                           lambda rid: runner.requests[rid].sampling_params,
                                           logits.device)
            except Exception as e:  # noqa: BLE001 - the rows' settings: vLLM samples them all
                self.runtime.faults.fault(e, num_rows)
                return super().sample(logits, sampling_metadata, logprobs_mode_override)
            if not batch.any_enabled:
                return super().sample(logits, sampling_metadata, logprobs_mode_override)
            # A fault anywhere in the Entropix path must not take the engine down:
            # the step's rows are then sampled by vLLM's own sampler (seeded rows
            # from their generators as they were before the step).
            seeded = [(g, g.get_state()) for i, g in sampling_metadata.generators.items()
                      if i < num_rows and batch.enabled[i]]
            try:
                out = self._entropix_rows(runner, batch, logits, sampling_metadata,
                                          logprobs_mode_override)
            except Exception as e:  # noqa: BLE001 - any fault falls back, logged
                for g, state in seeded:
                    g.set_state(state)
                return self._fallback(runner, batch, logits, sampling_metadata,
                                      logprobs_mode_override, e)
            self.runtime.faults.ok()
            return out

        def _fallback(self, runner, batch, logits, sampling_metadata, logprobs_mode_override, exc):
            num_rows = logits.shape[0]
            self.runtime.faults.fault(exc, int(batch.enabled.sum()))
            tokens, processed = super().sample(logits, sampling_metadata, logprobs_mode_override)
            try:
                keep = batch.enabled.copy()
                discard = getattr(runner, "discard_request_mask", None)
                if discard is not None:
                    keep &= ~discard.np[:num_rows]
                rows = np.nonzero(keep)[0].tolist()
                if rows and self.runtime.trace is not None:
                    seq_lens = runner.optimistic_seq_lens_cpu[:num_rows].numpy()
                    index = seq_lens - runner.input_batch.num_prompt_tokens[:num_rows]
                    host = tokens.reshape(-1).tolist()
                    self.runtime.trace_fallback([batch.req_ids[i] for i in rows],
                                                [int(index[i]) for i in rows],
                                                [int(host[i]) for i in rows],
                                                f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - the trace never takes the step down
                pass
            return tokens, processed

        def _entropix_rows(self, runner, batch, logits, sampling_metadata, logprobs_mode_override):
            num_rows = logits.shape[0]
            noise = batch_noise(batch, sampling_metadata.generators, K_MAX, logits.device)
            self.runtime.faults.maybe_inject()
            prev_is_cot = self._prev_is_cot(runner, num_rows, batch.cot_token)
            attn = attention.attention_stats_for_sampler(num_rows, logits.device)
            result = entropix_step_mod.entropix_step(logits, attn, batch.coeff_table,
                                                     batch.cot_token, prev_is_cot, noise)
            tokens = result.tokens
            processed = self._processed_logprobs(logits, sampling_metadata, logprobs_mode_override)

            if not batch.all_enabled:
                own_generators = {i: g for i, g in sampling_metadata.generators.items()
                                  if i < num_rows and not batch.enabled[i]}
                stock_md = dataclasses.replace(sampling_metadata, generators=own_generators)
                stock, stock_processed = super().sample(logits, stock_md, logprobs_mode_override)
                tokens = torch.where(batch.enabled_dev, tokens, stock.long())
                if processed is not None and stock_processed is not None:
                    processed = torch.where(batch.enabled_dev[:, None], processed, stock_processed)

            self._trace(runner, batch, result, num_rows)
            return tokens, processed

        @staticmethod
        def _save_discarded_generators(runner, sampling_metadata, num_rows, logits):
            """CPU: states of the generators of rows whose sample will be discarded."""
            if logits.device.type != "cpu" or not sampling_metadata.generators:
                return []
            discard = runner.discard_request_mask.np[:num_rows]
            return [(g, g.get_state()) for i, g in sampling_metadata.generators.items()
                    if i < num_rows and discard[i]]

        # -- pieces -----------------------------------------------------------------
        @staticmethod
        def _prev_is_cot(runner, num_rows: int, cot_token: torch.Tensor) -> torch.Tensor:
            qsl = runner.query_start_loc.gpu[1:num_rows + 1].long()
            last_input = runner.input_ids.gpu[qsl - 1].long()
            seq_lens = runner.optimistic_seq_lens_cpu[:num_rows].numpy()
            generated = seq_lens > runner.input_batch.num_prompt_tokens[:num_rows]
            generated = to_device(torch.from_numpy(generated), cot_token.device)
            return generated & (last_input == cot_token)

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

        def _trace(self, runner, batch, result, num_rows: int) -> None:
            writer = self.runtime.trace
            if writer is None:
                return
            keep = batch.enabled.copy()
            discard = getattr(runner, "discard_request_mask", None)
            if discard is not None:
                keep &= ~discard.np[:num_rows]
            rows = np.nonzero(keep)[0].tolist()
            if not rows:
                return
            seq_lens = runner.optimistic_seq_lens_cpu[:num_rows].numpy()
            index = seq_lens - runner.input_batch.num_prompt_tokens[:num_rows]
            tensors = entropix_step_mod.trace_tensors(result)
            writer.submit([batch.req_ids[i] for i in rows], [int(index[i]) for i in rows], tensors,
                          rows=rows)

    EntropixSamplerV1.__qualname__ = "EntropixSamplerV1"
    EntropixSamplerV1.__module__ = __name__
    return EntropixSamplerV1


def guard_cpu_generator_rewind(runner) -> None:
    """CPU runners: skip vLLM's ``set_offset`` rewind of discarded samples.

    :class:`EntropixSamplerV1` already left those generators as they were
    before the step, so there is nothing to rewind; CPU generators would
    raise on ``set_offset``.
    """
    if runner.device.type != "cpu":
        return
    orig = runner._bookkeeping_sync

    def _bookkeeping_sync(*args, **kwargs):
        batch = runner.input_batch
        n = batch.num_reqs
        discard = np.nonzero(runner.discard_request_mask.np[:n])[0]
        hidden = {int(i): batch.generators.pop(int(i)) for i in discard
                  if int(i) in batch.generators}
        try:
            return orig(*args, **kwargs)
        finally:
            batch.generators.update(hidden)

    runner._bookkeeping_sync = _bookkeeping_sync
