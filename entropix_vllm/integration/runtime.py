"""Per-engine Entropix state shared by the MRV1 and MRV2 samplers.

One :class:`EntropixRuntime` lives in each worker process whose engine runs
with ``sampler = "entropix"``. It holds what does not change from step to step:

* the engine configuration (``additional_config``), parsed once;
* the default CoT token id, resolved once from the model's tokenizer and
  logged (:func:`resolve_cot_token`);
* how a request's ``SamplingParams`` become its settings (:meth:`parse_row`;
  the samplers keep them in their ``rows.RowTable``);
* the trace writer, when ``trace_path`` is set, and the hand-off of a step's
  rows to it: one writer per engine, its lead worker (TP rank 0 of the last
  pipeline stage, whose tokens vLLM returns; under data parallelism each
  engine's lead appends to the same file, one ``O_APPEND`` write per batch);
* the fault guard (a failed Entropix step falls back to vLLM's sampling).

Nothing here imports the model runners, so both samplers and the plugin share it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch

from ..config import EngineConfig, parse_request_args, show
from ..model_id import ModelSource
from ..step import coefficient_rows
from .rows import RowConfig

logger = logging.getLogger("vllm.entropix")

#: TEST-ONLY fault switch: when this environment variable names a file (read
#: at start-up), every Entropix step raises while that file exists, so the
#: tests can drive the fallback to vLLM's sampling. Never set it in production.
TEST_FAULT_ENV = "ENTROPIX_VLLM_TEST_FAULT_FILE"
#: At most one fault line per this many seconds (besides one per burst).
FAULT_LOG_INTERVAL_S = 5.0
#: vLLM treats a temperature below this as greedy (vllm.sampling_params._SAMPLING_EPS).
GREEDY_EPS = 1e-5


class InjectedFault(RuntimeError):
    """The test-only fault of :data:`TEST_FAULT_ENV`."""


class FaultGuard:
    """Rate-limited reporting of faults of the Entropix step.

    A burst of faults is the faulted steps between two successful Entropix
    steps; the first fault of a burst logs one error line with its cause
    (unless a line was logged less than :data:`FAULT_LOG_INTERVAL_S` ago); the
    rest are counted and the count goes into the next line.
    """

    def __init__(self, fault_file: Optional[str] = None):
        self.fault_file = fault_file if fault_file is not None else os.environ.get(TEST_FAULT_ENV)
        self.faults = 0           # faulted steps, all time
        self.unlogged = 0         # faulted steps not yet reported in a line
        self.in_burst = False
        self.last_log = -1e18
        if self.fault_file:
            logger.warning("Entropix: TEST-ONLY fault injection is on (%s=%s): every Entropix "
                           "step raises while that file exists", TEST_FAULT_ENV, self.fault_file)

    def maybe_inject(self) -> None:
        if self.fault_file and os.path.exists(self.fault_file):
            raise InjectedFault(f"test fault injected ({TEST_FAULT_ENV})")

    def ok(self) -> None:
        self.in_burst = False

    def fault(self, exc: BaseException, num_rows: int) -> None:
        self.faults += 1
        self.unlogged += 1
        now = time.monotonic()
        if not self.in_burst and now - self.last_log >= FAULT_LOG_INTERVAL_S:
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            logger.error("Entropix step failed (%s: %s); %d row(s) of this step sampled by "
                         "vLLM's own sampler instead, marked 'fallback' in the trace; the "
                         "engine keeps serving (%d faulted step(s) since the last such line)",
                         type(exc).__name__, first, num_rows, self.unlogged)
            self.unlogged = 0
            self.last_log = now
        self.in_burst = True


# Tried in order when no CoT token is configured: the first text that the
# tokenizer encodes as exactly one token is the default CoT token.
COT_TOKEN_CANDIDATES = (" ...", "...", " …", "…")


def _tokenizer_for(model_config):
    from transformers import AutoTokenizer

    name = getattr(model_config, "tokenizer", None) or model_config.model
    return AutoTokenizer.from_pretrained(
        name, revision=getattr(model_config, "tokenizer_revision", None),
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)))


def single_token_id(tokenizer, text: str) -> Optional[int]:
    """The id of ``text`` when the tokenizer encodes it as exactly one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def resolve_cot_token(value, tokenizer, vocab_size: int, key: str) -> int:
    """A CoT token setting (id, text or None) as a token id; -1 means none.

    ``None``: the first of :data:`COT_TOKEN_CANDIDATES` that is one token of
    this tokenizer; if none is (or there is no tokenizer), -1: the insert
    branch then always samples with its fallback parameters. An explicit id
    must be below the vocabulary size; an explicit text must be one token.
    """
    from ..config import EntropixConfigError

    if isinstance(value, int):
        if not 0 <= value < vocab_size:
            raise EntropixConfigError(key, f"expected a token id in [0, {vocab_size}), got {value}")
        return value
    if isinstance(value, str):
        if tokenizer is None:
            raise EntropixConfigError(key, "a text CoT token needs the model's tokenizer "
                                           "(the engine runs with skip_tokenizer_init)")
        try:
            ids = tokenizer.encode(value, add_special_tokens=False)
        except Exception as e:  # odd text the tokenizer refuses: a refusal, not a fault
            raise EntropixConfigError(key, f"{show(value)} cannot be encoded by this model's "
                                           f"tokenizer ({type(e).__name__})") from None
        if len(ids) != 1:
            shown = ids if len(ids) <= 8 else f"{len(ids)} tokens"
            raise EntropixConfigError(key, f"expected one token of this model's tokenizer; "
                                           f"{show(value)} encodes to {shown}")
        return int(ids[0])
    if tokenizer is None:
        return -1
    for text in COT_TOKEN_CANDIDATES:
        tid = single_token_id(tokenizer, text)
        if tid is not None:
            return tid
    return -1


class EntropixRuntime:
    """Engine-wide Entropix state of one worker process."""

    def __init__(self, vllm_config, tp_rank: int = 0, tokenizer: Any = "auto",
                 last_stage: bool = True):
        self.engine = EngineConfig.from_additional_config(
            vllm_config.additional_config, model=ModelSource.of_vllm_config(vllm_config))
        self.options = self.engine.options
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        if tokenizer == "auto":
            tokenizer = None
            if not getattr(vllm_config.model_config, "skip_tokenizer_init", False):
                try:
                    tokenizer = _tokenizer_for(vllm_config.model_config)
                except Exception as e:  # a tokenizer-less deployment still runs
                    logger.warning("Entropix: could not load the tokenizer (%s); a text CoT "
                                   "token cannot be resolved", e)
        self.tokenizer = tokenizer
        self.cot_token_id = resolve_cot_token(self.options.cot_token, tokenizer, self.vocab_size,
                                              "additional_config.entropix.cot_token")
        self.tp_rank = tp_rank
        # The engine's lead worker: it logs the start-up lines and writes the trace.
        self.lead = tp_rank == 0 and last_stage
        self._trace = None
        self._warmed = False
        self.warmed_rows: list = []   # batch sizes the warm-up ran the step for
        self.faults = FaultGuard()
        self._log_start()

    # -- start-up -------------------------------------------------------------
    def _log_start(self) -> None:
        if not self.lead:
            return
        logger.info("%s", self.engine.preset_line())  # which preset, and why (auto: the match)
        if self.engine.preset_warning:
            logger.warning("%s", self.engine.preset_warning)
        if self.cot_token_id >= 0 and self.tokenizer is not None:
            text = self.tokenizer.decode([self.cot_token_id])
            logger.info("Entropix sampler on; CoT token %d (%r)%s", self.cot_token_id, text,
                        "" if self.options.cot_token is not None else ", resolved from the tokenizer")
        elif self.cot_token_id >= 0:
            logger.info("Entropix sampler on; CoT token %d", self.cot_token_id)
        else:
            logger.warning("Entropix sampler on; no CoT token: none of %s is a single token of "
                           "this tokenizer, so the insert-CoT branch samples with its fallback "
                           "parameters (set additional_config.entropix.cot_token)",
                           list(COT_TOKEN_CANDIDATES))

    @property
    def trace(self):
        """The trace writer (the lead worker, with ``trace_path`` set), else None."""
        if self._trace is None and self.options.trace_path and self.lead:
            from ..trace import TraceWriter

            self._trace = TraceWriter(self.options.trace_path)
            logger.info("Entropix: tracing every Entropix token to %s", self.options.trace_path)
        return self._trace

    # -- per request ------------------------------------------------------------
    def parse_row(self, sampling_params) -> RowConfig:
        """A request's settings from its ``SamplingParams`` (not cached)."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        req, cfg = parse_request_args(extra, self.engine.sampler, self.engine.presets)
        enabled = self.options.default_on if req.enabled is None else req.enabled
        if enabled and wants_greedy(sampling_params):
            # The request's own temperature 0 / top_k 1: vLLM's greedy token, exactly
            # (the row goes to vLLM's sampler; it is not an Entropix row).
            enabled = False
        cot = self.cot_token_id
        if req.cot_token is not None:
            cot = resolve_cot_token(req.cot_token, self.tokenizer, self.vocab_size,
                                    "entropix_cot_token")
        return RowConfig(enabled=bool(enabled), coeffs=coefficient_rows([cfg])[0], cot_token=cot,
                         n_draws=cfg.n_adaptive_samples)

    # -- start-up warm-up ------------------------------------------------------------
    def warm_up(self, logits: "torch.Tensor") -> None:
        """The Entropix step on the start-up profiling run's dummy logits (all
        rows with the engine's settings; the result is dropped), once: vLLM's
        memory profile then counts the step's peak, and its kernels are compiled
        before the first request (for the whole batch and for one row: the
        logit statistics' two launch layouts). Its noise is constant (ones):
        the warm-up moves no random generator, so the first real step draws
        what it would have drawn without it. A failure is logged, not raised:
        the step would fall back to vLLM's sampler at run time."""
        if self._warmed:
            return
        self._warmed = True
        from .. import step
        from ..contract import K_MAX

        try:
            cfg = self.engine.sampler
            for rows in sorted({logits.shape[0], 1}, reverse=True):
                x = logits[:rows].float()
                table = step.coefficient_table([cfg] * rows, x.device)
                noise = torch.ones(rows, cfg.n_adaptive_samples, K_MAX, device=x.device)
                cot = torch.full((rows,), self.cot_token_id, dtype=torch.int64, device=x.device)
                step.entropix_step(x, None, table, cot,
                                   torch.zeros(rows, dtype=torch.bool, device=x.device), noise)
                self.warmed_rows.append(rows)
        except Exception as e:  # noqa: BLE001 - the profile run must not die of it
            logger.warning("Entropix: the start-up warm-up of the Entropix step failed (%s: %s)",
                           type(e).__name__, e)

    # -- the trace ----------------------------------------------------------------
    def trace_rows(self, req_ids, index, keep, tensors) -> None:
        """Hand the rows ``keep`` (host bool ``[B]``) of a step to the trace
        writer: ``req_ids`` and ``index`` (their tokens' output positions) per
        row, ``tensors`` the step's ``[B]`` tensors (``step.trace_tensors``)."""
        writer = self.trace
        if writer is None:
            return
        rows = np.nonzero(keep)[0].tolist()
        if rows:
            writer.submit([req_ids[i] for i in rows], [int(index[i]) for i in rows], tensors,
                          rows=rows)

    def trace_fallback_rows(self, req_ids, index, keep, tokens: torch.Tensor, cause: str) -> None:
        """Trace records for rows a faulted step handed to vLLM's sampler (a
        fault's path: reads the tokens back to the host)."""
        writer = self.trace
        rows = np.nonzero(keep)[0].tolist()
        if writer is None or not rows:
            return
        host = tokens.reshape(-1).tolist()
        writer.submit_fallback([req_ids[i] for i in rows], [int(index[i]) for i in rows],
                               [int(host[i]) for i in rows], cause)


def wants_greedy(sampling_params) -> bool:
    """Whether a request's own fields ask for greedy decoding (temperature 0 or
    top_k 1), which an Entropix row honours by taking vLLM's greedy token."""
    t = getattr(sampling_params, "temperature", None)
    k = getattr(sampling_params, "top_k", None)
    try:
        return (t is not None and float(t) < GREEDY_EPS) or (k is not None and int(k) == 1)
    except (TypeError, ValueError):
        return False
