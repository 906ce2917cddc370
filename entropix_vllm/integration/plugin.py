"""The ``vllm.general_plugins`` entry point: ``register()``.

vLLM calls :func:`register` in every process it starts (API server, engine core,
each worker) before it builds engine arguments or model runners. First the
start-up probe (``vllm_api.probe``) reads the installed vLLM's source for every
internal the plugin uses; if the version is not supported or anything is
missing, one error names it all and vLLM runs untouched. Otherwise the hooks
below go in. They change nothing unless an engine is configured with
``sampler = "entropix"`` (``--sampler entropix``,
``--additional-config.sampler=entropix`` or ``LLM(...,
additional_config={"sampler": "entropix"})``), with one exception that never
changes a token: a request carrying ``entropix*`` keys in ``vllm_xargs`` to an
engine without the sampler is refused (HTTP 400) instead of being silently
ignored.

The hooks (every vLLM name they touch is in ``vllm_api.INTERNALS``):

* CLI: ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``--sampler``
  flag, stored as ``additional_config["sampler"]``;
* engine configuration: ``VllmConfig.__post_init__`` runs ``engine.py``'s
  checks and adjustments; ``VllmConfig.use_v2_model_runner`` is
  ``engine.runner_choice``;
* front end: ``InputProcessor._validate_params`` validates the per-request
  keys (HTTP 400 naming the key) and refuses requests only MRV2 serves on an
  engine the plugin moved to MRV1; 0.33's ``BeamSearchParams.configure_logprobs``
  likewise for beam allowlists;
* model runners, both the same way (:data:`RUNNERS`): ``__init__`` of each
  runner class makes the engine's runtime and installs the attention capture
  (``engine.start_worker``); the method that builds the sampler (MRV1:
  ``__init__``, MRV2: ``load_model``) runs with the runner module's
  ``Sampler`` name rebound to the Entropix subclass, which is then checked and
  bound to the runtime.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from . import engine, vllm_api

logger = logging.getLogger("vllm.entropix")

SAMPLER_CHOICES = ("default", "entropix")

_STATE = {"registered": False, "active": False, "orig_use_v2": None}


def supported_version(text: str) -> bool:
    return vllm_api.supported_version(text)


def register(source: Optional[vllm_api.Source] = None) -> bool:
    """Entry point (``vllm.general_plugins``): probe vLLM, then install the
    Entropix hooks, once per process. Returns whether the plugin is active.
    ``source`` (tests): the vLLM source the probe reads instead of the
    installed one."""
    if _STATE["registered"]:
        return _STATE["active"]
    _STATE["registered"] = True
    result = vllm_api.probe(source, vllm_api.vllm_version() if source is None else None)
    if not result.ok:
        logger.error("entropix-vllm: the Entropix plugin is NOT active and vLLM runs "
                     "unchanged: this vLLM (%s) lacks what the plugin uses: %s",
                     result.version, "; ".join(result.problems))
        return False
    _patch_cli()
    _patch_config()
    _patch_front_end()
    _quiet_stream_refusals()
    for spec in RUNNERS:
        patch_runner(spec)
    _STATE["active"] = True
    return True


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def _patch_cli() -> None:
    EngineArgs = vllm_api.engine_args_cls()
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = orig_add(parser, *args, **kwargs)
        if not any("--sampler" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--sampler", choices=SAMPLER_CHOICES, default=None,
                help="Token sampler (entropix-vllm plugin): 'entropix' samples each sequence "
                     "with Entropix (entropy/varentropy and attention-driven branching); "
                     "'default' is vLLM's own sampler. Same as "
                     "--additional-config.sampler=...; Entropix coefficients go to "
                     "--additional-config.entropix.<name>=<value>.")
        return parser

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        chosen = getattr(args, "sampler", None)
        if chosen is not None:
            ac = dict(engine_args.additional_config or {})
            if "sampler" in ac and ac["sampler"] != chosen:
                raise ValueError(f"--sampler {chosen} contradicts --additional-config "
                                 f"sampler={ac['sampler']!r}; give one of them")
            ac["sampler"] = chosen
            engine_args.additional_config = ac
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


# ----------------------------------------------------------------------------
# Engine configuration
# ----------------------------------------------------------------------------
def _patch_config() -> None:
    VllmConfig = vllm_api.vllm_config_cls()
    orig_post_init = VllmConfig.__post_init__
    orig_use_v2 = VllmConfig.use_v2_model_runner.fget
    _STATE["orig_use_v2"] = orig_use_v2

    def __post_init__(self, *args, **kwargs):
        on = engine.entropix_enabled(self)
        if on:
            engine.adjust_before_vllm(self)
        orig_post_init(self, *args, **kwargs)
        engine.engine_config(self)  # validates the sections (a wrong `sampler` value too)
        if on:
            engine.check(self)

    def use_v2_model_runner(self):
        vllm_v2 = orig_use_v2(self)
        if not engine.entropix_enabled(self):
            return vllm_v2
        return engine.runner_choice(self, vllm_v2).v2

    VllmConfig.__post_init__ = __post_init__
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)


def runner_choice(vllm_config) -> engine.RunnerChoice:
    """The runner choice of an Entropix engine (after :func:`register`)."""
    return engine.runner_choice(vllm_config, _STATE["orig_use_v2"](vllm_config))


def v2_refusal(vllm_config, what: str) -> Optional[str]:
    """``engine.v2_refusal`` with vLLM's own runner choice (after :func:`register`)."""
    if not engine.entropix_enabled(vllm_config):
        return None
    return engine.v2_refusal(vllm_config, _STATE["orig_use_v2"](vllm_config), what)


# ----------------------------------------------------------------------------
# Requests (front end)
# ----------------------------------------------------------------------------
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


def _quiet_stream_refusals() -> None:
    """Install :class:`QuietRefusals` on the handlers of vLLM's loggers."""
    for name in vllm_api.STREAM_ERROR_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, QuietRefusals) for f in log.filters):
            log.addFilter(QuietRefusals())


def _patch_front_end() -> None:
    SamplingParams = vllm_api.sampling_params_cls()
    InputProcessor = vllm_api.input_processor_cls()
    error = vllm_api.validation_error_cls()
    orig = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        if isinstance(params, SamplingParams):
            if getattr(params, "prompt_logprob_token_ids", None) is not None:
                why = v2_refusal(self.vllm_config, "prompt_logprob_token_ids")
                if why is not None:
                    raise error(why, parameter="prompt_logprob_token_ids")
        out = orig(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                tok = self.tokenizer
            except Exception:
                tok = None
            params.extra_args = validate_request_args(params.extra_args, self.vllm_config, tok)
        return out

    InputProcessor._validate_params = _validate_params
    vllm_api.patch_beam_allowlist(
        lambda config: v2_refusal(config, "a beam search with allowed_token_ids"))


# ----------------------------------------------------------------------------
# Model runners: MRV1 and MRV2 the same way
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunnerSpec:
    """How one model runner builds its sampler."""

    name: str
    runner_module: Callable        # -> vLLM's runner module (None: not in this build)
    build_method: str              # the runner method that instantiates ``Sampler``
    sampler_class: Callable        # -> the Entropix sampler class for this runner
    after_build: Optional[Callable] = None   # runner -> None, once the sampler is bound


def _mrv1_sampler():
    from .mrv1 import sampler_class
    return sampler_class()


def _mrv1_after_build(runner) -> None:
    from .mrv1 import guard_cpu_generator_rewind
    guard_cpu_generator_rewind(runner)


def _mrv2_sampler():
    from .mrv2 import sampler_class
    return sampler_class()


RUNNERS = (
    RunnerSpec("MRV1", vllm_api.mrv1_runner_module, "__init__", _mrv1_sampler,
               _mrv1_after_build),
    RunnerSpec("MRV2", vllm_api.mrv2_runner_module, "load_model", _mrv2_sampler),
)

_PATCHED_MARK = "_entropix_patched"


@contextlib.contextmanager
def rebound_sampler(runner_mod, sampler_cls):
    """While the block runs, ``runner_mod.Sampler`` is ``sampler_cls``."""
    saved = runner_mod.Sampler
    runner_mod.Sampler = sampler_cls
    try:
        yield
    finally:
        runner_mod.Sampler = saved


def bind_runner_sampler(runner, runtime, sampler_cls, name: str = "the model runner") -> None:
    """Check that ``runner`` built our sampler and attach the runtime to it."""
    sampler = getattr(runner, "sampler", None)
    if sampler is None:  # pooling model or a non-last pipeline stage: no sampler
        return
    if not isinstance(sampler, sampler_cls):
        raise RuntimeError(
            f"entropix-vllm: {name} built a {type(sampler).__name__} instead of its Sampler "
            "(watermarking or a model-specific custom sampler replace it), so the Entropix "
            "sampler cannot run in this engine; remove --sampler entropix or that feature")
    sampler.bind(runner, runtime)


def patch_runner(spec: RunnerSpec) -> bool:
    """Wrap ``spec``'s ``GPUModelRunner`` (idempotent); False when the runner
    module does not import in this build (e.g. MRV2 without Triton)."""
    runner_mod = spec.runner_module()
    if runner_mod is None:
        logger.debug("Entropix: vLLM's %s runner is not importable here; not patched", spec.name)
        return False
    cls = runner_mod.GPUModelRunner
    if cls.__dict__.get(_PATCHED_MARK, False):
        return True
    orig_init = cls.__init__
    orig_build = orig_init if spec.build_method == "__init__" else getattr(cls, spec.build_method)

    @functools.wraps(orig_build)
    def build(self, *args, **kwargs):
        runtime = getattr(self, "_entropix_runtime", None)
        if runtime is None:
            return orig_build(self, *args, **kwargs)
        sampler_cls = spec.sampler_class()
        with rebound_sampler(runner_mod, sampler_cls):
            out = orig_build(self, *args, **kwargs)
        bind_runner_sampler(self, runtime, sampler_cls, f"vLLM's {spec.name} runner")
        if spec.after_build is not None:
            spec.after_build(self)
        return out

    init_body = build if spec.build_method == "__init__" else orig_init
    orig_kv = cls.initialize_kv_cache

    @functools.wraps(orig_kv)
    def initialize_kv_cache(self, kv_cache_config, is_profiling=False, *args, **kwargs):
        out = orig_kv(self, kv_cache_config, is_profiling, *args, **kwargs)
        if getattr(self, "_entropix_runtime", None) is not None and not is_profiling:
            # The capture's buffers now, eagerly: never first inside a CUDA-graph capture.
            from . import attention
            attention.prepare()
        return out

    @functools.wraps(orig_init)
    def __init__(self, vllm_config, device, *args, **kwargs):
        if engine.entropix_enabled(vllm_config):
            self._entropix_runtime = engine.start_worker(vllm_config, device)
        return init_body(self, vllm_config, device, *args, **kwargs)

    cls.__init__ = __init__
    cls.initialize_kv_cache = initialize_kv_cache
    if spec.build_method != "__init__":
        setattr(cls, spec.build_method, build)
    setattr(cls, _PATCHED_MARK, True)
    return True
