"""The Entropix sampler for vLLM's Model Runner V2 (MRV2; GPU deployments' default runner).

vLLM internals touched (each named in ``vllm_api.INTERNALS``, MRV2 section):

* ``v1/worker/gpu/sample/sampler.py``, ``Sampler``: subclassed (the runner
  reads ``sampling_states``, ``penalties_state``, ``compute_nans``,
  ``get_logprobs_dims`` ... from its sampler). Overridden:

  - ``add_request(req_idx, sampling_params)``: the request's Entropix
    settings (``extra_args``) and, if seeded, its generator go into the
    :class:`~.rows.RowTable` slot ``req_idx``; for an Entropix request vLLM's
    ``SamplingStates`` receive a copy of the params with temperature 1,
    top_k 0 (= vocab), top_p 1 and min_p 0 (seed and logprobs kept;
    ``patches.apply_neutral_sampling_states``), so vLLM's pipeline leaves its
    logits at temperature 1 (Entropix chooses its own temperature and
    filters); the logits processors (bias, allowed tokens, min tokens,
    penalties, bad words, custom ones), thinking budget, logprob token ids
    and trace replay get the request's own params;
  - ``apply_staged_writes()``: also flushes the table to the device;
  - ``apply_sampling_params(...)``: unchanged, but while an Entropix batch
    is sampled its output (the logits after logit bias, penalties, bad words,
    custom processors and thinking budget, with the grammar bitmask the
    runner applied) is where the Entropix step reads the logits;
  - ``sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos,
    input_ids, expanded_local_pos, seq_lens_upper_bound_np, ...)``: the token
    choice. ``__call__`` is vLLM's: trace replay, logprobs of the returned
    tokens (raw or processed), ``num_sampled`` etc. are untouched.

* ``v1/worker/gpu/states.py``: ``RequestState.prompt_len`` / ``prefill_len``,
  ``index_to_req_id``.

One step (:meth:`EntropixSamplerV2.sample`), for a batch with at least one
Entropix row:

1. all rows Entropix: vLLM's ``apply_sampling_params`` (temperature 1 for
   these rows) gives the logits, no Gumbel pass; mixed batch: vLLM's own
   ``sample`` runs unchanged for the whole batch (so stock rows get exactly
   MRV2's tokens) and the Entropix step runs on the output of its
   ``apply_sampling_params`` call, before top-k/top-p touch it;
2. per-row settings: the table's device copies indexed by ``idx_mapping``
   (no Python loop over rows, no host sync: host decisions use
   ``idx_mapping_np`` only);
3. noise: ``RowTable.noise``, the policy MRV1 has: a seeded request draws
   ``n_draws x K`` values per produced token from its own generator (made
   here from its seed as vLLM's MRV1 runner makes it, and advanced past the
   tokens it already produced when a preempted request comes back), other
   rows from the device's default generator; so a seeded request gives the
   same tokens as under MRV1;
4. ``prev_is_cot``: the input token at the row's logits position equals the
   row's CoT token and that position is past the prompt
   (``pos >= prompt_len``; after preemption the re-prefilled output tokens
   count as generated);
5. attention figures: :func:`attention.attention_stats_for_sampler`;
6. :func:`entropix_vllm.step.entropix_step` on every row (one pass over the
   logits; the results of stock rows are dropped, which avoids a per-step
   host-to-device row index); tokens of stock rows come from vLLM's
   ``sample`` (``torch.where`` on a device mask);
7. the trace (rank 0, when configured) for Entropix rows that produce a token.

Not supported: speculative decoding (refused by the plugin), watermarking and
model-specific custom samplers (start-up error), batch-sharded sampling
(switched off by ``engine.adjust_before_vllm``), ``return_sampling_mask``
(reports temperature-1 support for Entropix rows). A freed request slot
keeps its Entropix flag until reused, so a later dummy run (data-parallel
idle steps) may take the Entropix path on dummy rows; its tokens are
discarded.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .. import step as step_mod
from ..contract import K_MAX
from . import attention, patches, vllm_api
from .rows import RowTable, prev_is_cot, seeded_generator

Sampler = vllm_api.mrv2_sampler_base()


def neutral_sampling_params(sampling_params):
    """A copy of ``sampling_params`` that vLLM's sampling leaves at temperature 1.

    Temperature 1, top_k 0 (the whole vocabulary), top_p 1, min_p 0; every
    other field is the request's (the copy shares them).
    """
    p = copy.copy(sampling_params)
    p.temperature = 1.0
    p.top_k = 0
    p.top_p = 1.0
    p.min_p = 0.0
    return p


@dataclass
class _Pending:
    """The Entropix part of the ``sample`` call in progress."""

    idx_mapping: torch.Tensor
    idx_mapping_np: np.ndarray
    pos: torch.Tensor
    input_ids: torch.Tensor
    seq_lens_upper_bound_np: np.ndarray
    result: Any = None              # step.StepResult once computed


class EntropixSamplerV2(Sampler):
    """MRV2 ``Sampler`` with Entropix for the rows that use it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = torch.device(
            inspect.signature(Sampler.__init__).bind(self, *args, **kwargs).arguments["device"])
        self.runtime = None
        self.rows = RowTable(self.sampling_states.max_num_reqs, self.device)
        self._pending: Optional[_Pending] = None
        self._adding_entropix = False
        patches.apply_neutral_sampling_states(
            self.sampling_states,
            lambda params: neutral_sampling_params(params) if self._adding_entropix else params)

    def bind(self, runner, runtime) -> None:
        """Attach the engine's :class:`EntropixRuntime` (before any request);
        ``runner`` is not needed (MRV2 hands the sampler what it reads)."""
        del runner
        self.runtime = runtime

    # -- requests ----------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> None:
        row = self.runtime.parse_row(sampling_params) if self.runtime is not None else None
        self._adding_entropix = row is not None and row.enabled
        try:
            super().add_request(req_idx, sampling_params)
        finally:
            self._adding_entropix = False
        seed = getattr(sampling_params, "seed", None)
        generator = None
        if row is not None and row.enabled and seed is not None:
            generator = seeded_generator(seed, self.device)
        self.rows.put(req_idx, row, generator)
        if generator is not None:
            # A preempted request comes back with its output tokens in its prefill:
            # skip the draws those tokens took, as MRV1's persistent generator has.
            done = int(self.req_states.prefill_len.np[req_idx]
                       - self.req_states.prompt_len.np[req_idx])
            skip = torch.empty(int(self.rows.n_draws[req_idx]), K_MAX, device=self.device)
            for _ in range(max(0, done)):   # one draw per token, as taken (rare)
                skip.exponential_(generator=generator)

    def apply_staged_writes(self) -> None:
        super().apply_staged_writes()
        self.rows.flush()

    # -- sampling ------------------------------------------------------------------
    def apply_sampling_params(self, logits, *args, **kwargs):
        out = super().apply_sampling_params(logits, *args, **kwargs)
        p = self._pending
        if p is not None and p.result is None:
            # Entropix rows: temperature 1, before any top-k/top-p.
            p.result = self._entropix(out, p)
        return out

    def sample(self, logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos, input_ids,
               expanded_local_pos, seq_lens_upper_bound_np, *args, **kwargs):
        step_args = (expanded_idx_mapping, idx_mapping, idx_mapping_np, pos, input_ids,
                     expanded_local_pos, seq_lens_upper_bound_np)
        num_rows = logits.shape[0]
        if self.runtime is None or num_rows == 0 or num_rows != len(idx_mapping_np):
            # Not bound, or one logits row per draft token (speculative
            # decoding, refused at start-up).
            return super().sample(logits, *step_args, *args, **kwargs)
        self.runtime.warm_up(logits)   # once: the profiling run comes first
        enabled = self.rows.enabled[idx_mapping_np]
        if not enabled.any():
            return super().sample(logits, *step_args, *args, **kwargs)

        rows = (expanded_idx_mapping if expanded_idx_mapping is not None else idx_mapping)
        self._pending = pending = _Pending(rows.long().clamp_min(0), idx_mapping_np, pos,
                                           input_ids, np.asarray(seq_lens_upper_bound_np))
        try:
            if enabled.all():
                processed = self.apply_sampling_params(logits, *step_args,
                                                       skip_top_k_top_p=True)
                result = pending.result
                tokens = result.tokens
            else:
                sampled, processed = super().sample(logits, *step_args, *args, **kwargs)
                result = pending.result
                if result is None:
                    raise RuntimeError("vLLM's MRV2 Sampler.sample did not call "
                                       "apply_sampling_params, where the Entropix step runs")
                _, _, mask = self.rows.gather(pending.idx_mapping)
                tokens = torch.where(mask, result.tokens, sampled.to(torch.int64))
        except Exception as e:  # noqa: BLE001 - a fault falls back to vLLM's sampling
            self._pending = None
            self.runtime.faults.fault(e, int(enabled.sum()))
            return super().sample(logits, *step_args, *args, **kwargs)
        finally:
            self._pending = None
        self.runtime.faults.ok()
        keep = enabled & self._produces_token(pending)
        index = pending.seq_lens_upper_bound_np[:num_rows] - \
            self.req_states.prompt_len.np[idx_mapping_np]
        req_ids = [self.req_states.index_to_req_id.get(int(i), "") for i in idx_mapping_np]
        self.runtime.trace_rows(req_ids, index, keep, step_mod.trace_tensors(result, tokens))
        return tokens, processed

    # -- pieces ----------------------------------------------------------------------
    def _produces_token(self, p: _Pending) -> np.ndarray:
        """Rows whose sample is kept: a chunk of a prefill that is not the last
        one produces no token (host)."""
        n = len(p.idx_mapping_np)
        return p.seq_lens_upper_bound_np[:n] >= self.req_states.prefill_len.np[p.idx_mapping_np]

    def _entropix(self, logits: torch.Tensor, p: _Pending):
        table, cot, _ = self.rows.gather(p.idx_mapping)
        noise = self.rows.noise(p.idx_mapping_np, self._produces_token(p))
        prompt_len = self.req_states.prompt_len.gpu[p.idx_mapping].long()
        prev = prev_is_cot(p.input_ids, p.pos.long() >= prompt_len, cot)
        self.runtime.faults.maybe_inject()
        attn = attention.attention_stats_for_sampler(logits.shape[0], logits.device)
        return step_mod.entropix_step(logits, attn, table, cot, prev, noise)
