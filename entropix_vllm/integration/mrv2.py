"""The Entropix sampler for vLLM's Model Runner V2 (MRV2; GPU deployments' default runner).

vLLM internals touched (each named in ``vllm_api.INTERNALS``, MRV2 section):

* ``v1/worker/gpu/sample/sampler.py``, ``Sampler``: subclassed (the runner
  reads ``sampling_states``, ``penalties_state``, ``compute_nans``,
  ``get_logprobs_dims`` ... from its sampler). Overridden:

  - ``add_request(req_idx, sampling_params)``: the request's Entropix
    settings (``extra_args``) go into per-``req_idx`` tables; for an Entropix
    request vLLM's ``SamplingStates.add_request`` receives a copy of the
    params with temperature 1, top_k 0 (= vocab), top_p 1 and min_p 0 (seed
    and logprobs kept), so vLLM's pipeline leaves its logits at temperature 1
    (Entropix chooses its own temperature and filters); the logits
    processors (bias, allowed tokens, min tokens, penalties, bad words,
    custom ones), thinking budget, logprob token ids and trace replay get the
    request's own params;
  - ``apply_staged_writes()``: flushes those tables to the device;
  - ``apply_sampling_params(...)``: unchanged, but while an Entropix batch
    is sampled its output (the logits after logit bias, penalties, bad words,
    custom processors and thinking budget, with the grammar bitmask the
    runner applied) is where the Entropix step reads the logits;
  - ``sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos,
    input_ids, expanded_local_pos, seq_lens_upper_bound_np, return_logprobs)``:
    the token choice. ``__call__`` is vLLM's: trace replay, logprobs of the
    returned tokens (raw or processed), ``num_sampled`` etc. are untouched.

* ``v1/worker/gpu/sample/states.py``: ``SamplingStates.seeds`` (int64 per
  ``req_idx``: the request's seed, or a random one drawn in ``add_request``,
  which is what vLLM's own Gumbel sampling uses on every TP rank).
* ``v1/worker/gpu/states.py``: ``RequestState.prompt_len`` / ``prefill_len``
  (``UvaBackedTensor``), ``index_to_req_id``.
* ``v1/worker/gpu/buffer_utils.py``: ``UvaBackedTensor`` for the per-slot
  tables (vLLM's own host-table-to-device mechanism, pinned and round-robin
  so an in-flight step never reads a half-written table).
* ``v1/worker/gpu/model_runner.py``, ``GPUModelRunner``: patched by the
  plugin the same way as MRV1's runner (``plugin.RUNNERS``): ``__init__`` makes
  the runtime and installs the attention capture before the first forward;
  ``load_model`` (where vLLM builds ``self.sampler = Sampler(**sampler_kwargs)``)
  runs with the module-level name ``Sampler`` bound to our subclass.
  Subclasses (the CPU and XPU MRV2 runners) inherit both wrappers. 0.33's
  profiling warm-up adds warm-up requests through ``add_request``: handled
  like any request.

One step (``sample``), for a batch with at least one Entropix row:

1. all rows Entropix: vLLM's ``apply_sampling_params`` (temperature 1 for
   these rows) gives the logits, no Gumbel pass; mixed batch: vLLM's own
   ``sample`` runs unchanged for the whole batch (so stock rows get exactly
   MRV2's tokens) and the Entropix step runs on the output of its
   ``apply_sampling_params`` call, before top-k/top-p touch it;
2. per-row settings: device tables indexed by ``idx_mapping`` (no Python loop
   over rows, no host sync: host decisions use ``idx_mapping_np`` only);
3. noise: :func:`entropix_vllm.ops.seeded_exponential_noise`
   keyed by (``SamplingStates.seeds[req_idx]``, position), so a seeded request gives
   the same tokens whatever else is in the batch, and every TP rank (same
   logits, same seeds, same attention figures) the same tokens;
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

Version notes: 0.33 adds an argument to ``SamplingStates.get_top_k_top_p``;
this module never calls it (vLLM's own ``sample`` does; the drift test checks
every internal this module does use in 0.32 and 0.33). ``sample`` and
``apply_sampling_params`` arguments are matched by name from the base class
signature, and a missing name raises at start-up, naming it. Not supported:
speculative decoding (refused by the plugin), watermarking and
model-specific custom samplers (start-up error), batch-sharded sampling
(switched off by ``attention.install``), ``return_sampling_mask`` (reports
temperature-1 support for Entropix rows). A freed request slot keeps its
Entropix flag until reused, so a later dummy run (data-parallel idle steps)
may take the Entropix path on dummy rows; its tokens are discarded. The
same seed gives different tokens on MRV1 (torch generators) and MRV2
(hashed noise).

Tests: ``tests/test_mrv2_sampler.py`` builds this sampler from vLLM 0.32's
real MRV2 classes on CPU (vLLM's MRV2 Triton kernels under the Triton
interpreter, in a child process) and checks Entropix rows against
``entropix_step``, stock rows against vLLM's stock ``Sampler``, masks,
logprobs, CoT handling, batch independence and the runner rebinding; the
noise kernel against its torch fallback. What awaits a GPU build of vLLM is
listed at the top of that file.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .. import step as step_mod
from ..config import K_MAX
from . import vllm_api

_SAMPLER_CLS = None

# Names of Sampler.sample's arguments this module reads (after self, logits).
_REQUIRED_SAMPLE_ARGS = vllm_api.internal(
    "vllm.v1.worker.gpu.sample.sampler:Sampler.sample").params[2:]


# ----------------------------------------------------------------------------
# Per-request settings
# ----------------------------------------------------------------------------
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


@contextlib.contextmanager
def _neutral_sampling_states(sampling_states, sampling_params):
    """While the block runs, ``sampling_states.add_request`` gets the neutral copy.

    Only vLLM's ``SamplingStates`` (temperature, top_k, top_p, min_p, seed,
    logprobs) sees it; the logits processors, thinking budget, logprob token
    ids and trace replay get the request's own params.
    """
    orig = sampling_states.add_request
    neutral = neutral_sampling_params(sampling_params)

    def add_request(req_idx, _params, *args, **kwargs):
        return orig(req_idx, neutral, *args, **kwargs)

    sampling_states.add_request = add_request
    try:
        yield
    finally:
        del sampling_states.add_request  # the class's method again


def _row_settings(runtime, sampling_params):
    """The request's :class:`~entropix_vllm.integration.runtime.RowConfig`.

    Parsed afresh on every ``add_request`` (a slot may be refilled by the same
    request id with new params, e.g. streaming input), so the runtime's
    per-request-id cache is not used.
    """
    return runtime.parse_row(sampling_params)


@dataclass
class _Pending:
    """The Entropix part of the ``sample`` call in progress."""

    args: dict
    enabled_np: np.ndarray          # [B] host
    result: Any = None              # step.StepResult once computed


# ----------------------------------------------------------------------------
# The sampler class (built lazily: importing this module imports no MRV2 code)
# ----------------------------------------------------------------------------
def _param_names(fn) -> list:
    return list(inspect.signature(fn).parameters)[2:]  # after self, logits


def _required(fn) -> set:
    return {n for n, p in list(inspect.signature(fn).parameters.items())[2:]
            if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _make_sampler_class(Base):
    sample_names = _param_names(Base.sample)
    missing = [f"Sampler.sample argument {n!r}" for n in _REQUIRED_SAMPLE_ARGS
               if n not in sample_names]
    if not hasattr(Base, "apply_sampling_params"):
        missing.append("(method) Sampler.apply_sampling_params")
    if missing:
        raise RuntimeError(
            "entropix-vllm: this vLLM's MRV2 Sampler lacks what the Entropix MRV2 sampler "
            f"reads (from vLLM 0.32): {', '.join(missing)}. Run the V1 model runner "
            "(VLLM_USE_V2_MODEL_RUNNER=0) or a supported vLLM.")
    asp_names = _param_names(Base.apply_sampling_params)
    asp_required = _required(Base.apply_sampling_params)
    fast_path_ok = asp_required <= set(sample_names)
    asp_takes_skip = "skip_top_k_top_p" in asp_names

    UvaBackedTensor = vllm_api.uva_backed_tensor_cls()

    from .. import ops
    from . import attention

    class EntropixSamplerV2(Base):
        """MRV2 ``Sampler`` with Entropix for the rows that use it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            n = self.sampling_states.max_num_reqs
            self.runtime = None
            self._pending: Optional[_Pending] = None
            self._enabled_np = np.zeros(n, dtype=bool)
            self._n_draws_np = np.ones(n, dtype=np.int64)
            self._enabled = UvaBackedTensor(n, dtype=torch.int32)
            self._coeffs = UvaBackedTensor((n, len(step_mod.COEFF_NAMES)), dtype=torch.float64)
            self._cot = UvaBackedTensor(n, dtype=torch.int64)
            self._cot.np.fill(-1)
            self._dirty = True

        def bind(self, runner, runtime) -> None:
            """Attach the engine's :class:`EntropixRuntime` (before any request);
            ``runner`` is not needed (MRV2 hands the sampler what it reads)."""
            del runner
            self.runtime = runtime

        # -- requests ----------------------------------------------------------
        def add_request(self, req_idx: int, sampling_params) -> None:
            row = None
            if self.runtime is not None:
                row = _row_settings(self.runtime, sampling_params)
            enabled = row is not None and row.enabled
            if enabled:
                with _neutral_sampling_states(self.sampling_states, sampling_params):
                    super().add_request(req_idx, sampling_params)
            else:
                super().add_request(req_idx, sampling_params)
            self._enabled_np[req_idx] = enabled
            self._enabled.np[req_idx] = int(enabled)
            if enabled:
                self._coeffs.np[req_idx] = row.coeffs
                self._cot.np[req_idx] = row.cot_token
                self._n_draws_np[req_idx] = max(1, int(row.n_draws))
            self._dirty = True

        def apply_staged_writes(self) -> None:
            super().apply_staged_writes()
            if self._dirty:
                self._enabled.copy_to_uva()
                self._coeffs.copy_to_uva()
                self._cot.copy_to_uva()
                self._dirty = False

        # -- sampling ------------------------------------------------------------
        def apply_sampling_params(self, logits, *args, **kwargs):
            out = super().apply_sampling_params(logits, *args, **kwargs)
            p = self._pending
            if p is not None and p.result is None:
                # Entropix rows: temperature 1, before any top-k/top-p.
                p.result = self._entropix(out, p)
            return out

        def sample(self, logits, *args, **kwargs):
            a = dict(zip(sample_names, args))
            a.update(kwargs)
            idx_np = a["idx_mapping_np"]
            num_rows = logits.shape[0]
            if self.runtime is None or num_rows == 0 or num_rows != len(idx_np):
                # Not bound, or one logits row per draft token (speculative
                # decoding, refused at start-up).
                return super().sample(logits, *args, **kwargs)
            enabled = self._enabled_np[idx_np]
            if not enabled.any():
                return super().sample(logits, *args, **kwargs)

            pending = _Pending(args=a, enabled_np=enabled)
            self._pending = pending
            try:
                if enabled.all() and fast_path_ok:
                    asp = {n: a[n] for n in asp_names if n in a}
                    if asp_takes_skip:
                        asp["skip_top_k_top_p"] = True
                    processed = self.apply_sampling_params(logits, **asp)
                    result = pending.result
                    tokens = result.tokens
                else:
                    sampled, processed = super().sample(logits, *args, **kwargs)
                    result = pending.result
                    if result is None:
                        raise RuntimeError(
                            "entropix-vllm: vLLM's MRV2 Sampler.sample did not call "
                            "apply_sampling_params (as vLLM 0.32 does); this vLLM version "
                            "is not supported by the Entropix MRV2 sampler")
                    mask = self._enabled.gpu[self._rows(a)] != 0
                    tokens = torch.where(mask, result.tokens, sampled.to(torch.int64))
            except Exception as e:  # noqa: BLE001 - a fault falls back to vLLM's sampling
                self._pending = None
                self.runtime.faults.fault(e, int(enabled.sum()))
                return super().sample(logits, *args, **kwargs)
            finally:
                self._pending = None
            self.runtime.faults.ok()
            self._trace(a, enabled, result, tokens)
            return tokens, processed

        # -- pieces ----------------------------------------------------------------
        @staticmethod
        def _rows(a: dict) -> torch.Tensor:
            idx = a.get("expanded_idx_mapping")
            if idx is None:
                idx = a["idx_mapping"]
            return idx.long().clamp_min(0)

        def _entropix(self, logits: torch.Tensor, p: _Pending):
            a = p.args
            rows = self._rows(a)
            B = logits.shape[0]
            table = self._coeffs.gpu[rows]
            cot = self._cot.gpu[rows]
            pos = a["pos"].long()
            n_draws = int(self._n_draws_np[a["idx_mapping_np"]][p.enabled_np].max())
            noise = ops.seeded_exponential_noise(self.sampling_states.seeds.gpu[rows], pos,
                                                 n_draws, K_MAX)
            prompt_len = self.req_states.prompt_len.gpu[rows].long()
            prev_is_cot = (pos >= prompt_len) & (a["input_ids"].long() == cot)
            self.runtime.faults.maybe_inject()
            attn = attention.attention_stats_for_sampler(B, logits.device)
            return step_mod.entropix_step(logits, attn, table, cot, prev_is_cot, noise)

        def _trace(self, a: dict, enabled: np.ndarray, result, tokens: torch.Tensor) -> None:
            writer = self.runtime.trace
            if writer is None:
                return
            idx_np = np.asarray(a["idx_mapping_np"])
            seq_lens = a.get("seq_lens_upper_bound_np")
            if seq_lens is None:
                return
            seq_lens = np.asarray(seq_lens)[:len(idx_np)]
            # A chunk of a prefill that is not the last one produces no token.
            keep = enabled & (seq_lens >= self.req_states.prefill_len.np[idx_np])
            rows = np.nonzero(keep)[0].tolist()
            if not rows:
                return
            index = seq_lens - self.req_states.prompt_len.np[idx_np]
            req_ids = [self.req_states.index_to_req_id.get(int(idx_np[i]), "") for i in rows]
            tensors = step_mod.trace_tensors(result, tokens)
            writer.submit(req_ids, [int(index[i]) for i in rows], tensors, rows=rows)

    EntropixSamplerV2.__qualname__ = "EntropixSamplerV2"
    EntropixSamplerV2.__module__ = __name__
    return EntropixSamplerV2


def sampler_class():
    """``EntropixSamplerV2``, built on first use from vLLM's MRV2 ``Sampler``."""
    global _SAMPLER_CLS
    if _SAMPLER_CLS is None:
        _SAMPLER_CLS = _make_sampler_class(vllm_api.mrv2_sampler_base())
    return _SAMPLER_CLS


def __getattr__(name: str):
    # ``from entropix_vllm.integration.mrv2 import EntropixSamplerV2`` imports
    # vLLM's MRV2 sampler only then.
    if name == "EntropixSamplerV2":
        return sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
