"""The ``vllm.general_plugins`` entry point, and what the plugin does at vLLM's front door.

vLLM calls :func:`register` in every process it starts (API server, engine core,
each worker) before it builds engine arguments or model runners. First the
start-up probe (``vllm_source.probe``) reads the installed vLLM's source for
every internal the plugin uses; if the version is not supported or anything is
missing, one error names it all and vLLM runs untouched. Otherwise
:func:`apply_patches` binds the hooks (every change to a vLLM object is in
``patches.py``). They change nothing unless an engine is configured with
``sampler = "entropix"`` (``--sampler entropix``,
``--additional-config.sampler=entropix`` or ``LLM(...,
additional_config={"sampler": "entropix"})``), with one exception that never
changes a token: a request carrying ``entropix*`` keys in ``vllm_xargs`` to an
engine without the sampler is refused (HTTP 400) instead of being silently
ignored.

Here: the ``--sampler`` flag (:func:`add_sampler_flag`,
:func:`sampler_flag_into`), the request checks (:func:`refuse_v2_only`,
:func:`validate_request_args`, :func:`validated_extra_args`) and
:class:`QuietRefusals`. The samplers (``mrv1.py``, ``mrv2.py``) are imported
only when a runner of an Entropix engine builds one.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..config import SAMPLERS
from . import engine, patches, vllm_api, vllm_source

logger = logging.getLogger("vllm.entropix")

_STATE = {"registered": False, "active": False}


def supported_version(text: str) -> bool:
    return vllm_api.supported_version(text)


def register(source: Optional[vllm_source.Source] = None) -> bool:
    """Entry point (``vllm.general_plugins``): probe vLLM, then apply the
    patches, once per process. Returns whether the plugin is active.
    ``source`` (tests): the vLLM source the probe reads instead of the
    installed one."""
    if _STATE["registered"]:
        return _STATE["active"]
    _STATE["registered"] = True
    result = vllm_source.probe(source, vllm_api.vllm_version() if source is None else None)
    if not result.ok:
        logger.error("entropix-vllm: the Entropix plugin is NOT active and vLLM runs "
                     "unchanged: this vLLM (%s) lacks what the plugin uses: %s",
                     result.version, "; ".join(result.problems))
        return False
    apply_patches()
    _STATE["active"] = True
    return True


def apply_patches() -> None:
    """Every class- and module-level patch, bound to its hooks (``patches.py``)."""
    patches.apply_cli(add_sampler_flag, sampler_flag_into)
    patches.apply_engine_config(engine.before_vllm_post_init, engine.after_vllm_post_init,
                                engine.use_v2_model_runner)
    patches.apply_front_end(refuse_v2_only, validated_extra_args)
    patches.apply_beam_allowlist_guard(
        lambda config: v2_refusal(config, "a beam search with allowed_token_ids"))
    patches.apply_quiet_stream_refusals(QuietRefusals)
    patches.apply_mrv1_fused_sample_guard(_entropix_sampling)
    patches.apply_worker_check(engine.check_workers)
    hooks = engine.worker_hooks()
    for spec in patches.RUNNERS:
        patches.apply_runner(spec, hooks)


def _entropix_sampling() -> bool:
    """An Entropix MRV1 sampler is sampling on this thread (0.33's fused-path guard)."""
    from .mrv1 import entropix_sampling
    return entropix_sampling()


# ----------------------------------------------------------------------------
# The --sampler flag
# ----------------------------------------------------------------------------
def add_sampler_flag(parser):
    """``--sampler`` on vLLM's argument parser (once)."""
    if not any("--sampler" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--sampler", choices=SAMPLERS, default=None,
            help="Token sampler (entropix-vllm plugin): 'entropix' samples each sequence "
                 "with Entropix (entropy/varentropy and attention-driven branching); "
                 "'default' is vLLM's own sampler. Same as "
                 "--additional-config.sampler=...; Entropix coefficients go to "
                 "--additional-config.entropix.<name>=<value>.")
    return parser


def sampler_flag_into(engine_args, args):
    """``--sampler`` into ``engine_args.additional_config["sampler"]`` (a
    contradicting ``--additional-config`` sampler is an error, not dropped)."""
    chosen = getattr(args, "sampler", None)
    if chosen is not None:
        ac = dict(engine_args.additional_config or {})
        if "sampler" in ac and ac["sampler"] != chosen:
            raise ValueError(f"--sampler {chosen} contradicts --additional-config "
                             f"sampler={ac['sampler']!r}; give one of them")
        ac["sampler"] = chosen
        engine_args.additional_config = ac
        # The parsed arguments too: processes vLLM starts later from them build
        # their engine arguments before any plugin is loaded there (the extra API
        # servers of `vllm serve --data-parallel-size N`, which would otherwise
        # not know the engine runs Entropix and refuse its request keys).
        if hasattr(args, "additional_config"):
            args.additional_config = dict(ac)
    return engine_args


# ----------------------------------------------------------------------------
# Requests (front end)
# ----------------------------------------------------------------------------
def runner_choice(vllm_config) -> engine.RunnerChoice:
    """The runner choice of an Entropix engine (after :func:`register`)."""
    return engine.runner_choice(vllm_config)


def v2_refusal(vllm_config, what: str) -> Optional[str]:
    """``engine.v2_refusal``: why ``what`` is refused on this engine, or None."""
    return engine.v2_refusal(vllm_config, what)


def refuse_v2_only(vllm_config, params) -> None:
    """Before vLLM's checks: a request only MRV2 serves, on an engine the
    plugin moved to MRV1, is refused (HTTP 400 naming why)."""
    if isinstance(params, vllm_api.sampling_params_cls()) and \
            getattr(params, "prompt_logprob_token_ids", None) is not None:
        why = v2_refusal(vllm_config, "prompt_logprob_token_ids")
        if why is not None:
            raise vllm_api.validation_error_cls()(why, parameter="prompt_logprob_token_ids")


def validated_extra_args(processor, params) -> None:
    """After vLLM's checks: the request's Entropix keys validated (a text CoT
    token resolved with the front end's tokenizer)."""
    if isinstance(params, vllm_api.sampling_params_cls()) and params.extra_args:
        try:
            tok = processor.tokenizer
        except Exception:
            tok = None
        params.extra_args = validate_request_args(params.extra_args, processor.vllm_config, tok)


def validate_request_args(extra_args, vllm_config, tokenizer=None):
    """Check a request's ``vllm_xargs``; returns the (possibly resolved) mapping.

    Raises ``VLLMValidationError`` (HTTP 400) naming the key. A text
    ``entropix_cot_token`` is resolved to its token id here, where the
    tokenizer is at hand.
    """
    from ..config import EntropixConfigError, is_request_key, parse_request_args, show
    from .runtime import resolve_cot_token

    if not extra_args:
        return extra_args
    error = vllm_api.validation_error_cls()
    if not hasattr(extra_args, "items"):
        raise error(f"vllm_xargs: expected an object, got {show(extra_args)}",
                    parameter="vllm_xargs", value=show(extra_args))
    # The namespace: `entropix` / `entropix_<name>` ignoring case, spaces and
    # '-'/'_' (near misses are ours too: refused naming the intended key).
    ours = [k for k in extra_args if is_request_key(k)]
    if not ours:
        return extra_args
    if not engine.entropix_enabled(vllm_config):
        k = ours[0]
        k = k if len(k) <= 80 else show(k)
        raise _refusal(error(
            f"vllm_xargs.{k}: this server does not run the Entropix sampler (start it with "
            f"--sampler entropix); Entropix keys are refused rather than ignored",
            parameter=f"vllm_xargs.{k}", value=show(extra_args.get(k))))
    cfg = engine.engine_config(vllm_config)
    try:
        req, _ = parse_request_args(extra_args, cfg.sampler, cfg.presets)
        if req.cot_token is not None:
            vocab = vllm_config.model_config.get_vocab_size()
            tid = resolve_cot_token(req.cot_token, tokenizer, vocab, "entropix_cot_token")
            if tid != req.cot_token:
                extra_args = {**extra_args, "entropix_cot_token": tid}
    except EntropixConfigError as e:
        raise _refusal(error(f"vllm_xargs.{e}", parameter=f"vllm_xargs.{e.key}",
                             value=show(extra_args.get(e.key)))) from None
    return extra_args


def _refusal(exc):
    """Mark a request refusal of ours (see :class:`QuietRefusals`)."""
    exc.entropix_refusal = True
    return exc


class QuietRefusals(logging.Filter):
    """One line, no traceback, for a refused request that vLLM logs with its
    traceback: vLLM validates a *streamed* request once the stream has begun
    and logs any exception there with ``logger.exception`` (the client gets
    the HTTP 400 error event either way). Only the plugin's own refusals
    (marked by :func:`_refusal`) are rewritten; everything else passes as is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, "entropix_refusal", False):
            original = record.getMessage()
            record.msg = "%s Request refused (HTTP 400 error event in the stream): %s"
            record.args = (original, str(exc)[:500])
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
