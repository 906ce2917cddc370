"""Every change the plugin makes to a vLLM object, in one module.

One ``apply_*`` function per target; every replacement goes through
:func:`wrap` (idempotent: it sets ``__wrapped__`` to the original and
:data:`MARK` to the internal's path) and is gated by the series table
(``vllm_api.INTERNALS``: an internal the running vLLM series does not have
is not patched). What a replacement *does* lives with its subject (``plugin``:
the flag and request checks; ``engine``: configuration checks and the runner
choice; ``attention``: the capture; ``mrv1``/``mrv2``: the samplers); this
module only binds it to vLLM.

============================================  ==========================================
vLLM object                                   patched by
============================================  ==========================================
``EngineArgs.add_cli_args`` / ``from_cli_args``  :func:`apply_cli`
``VllmConfig.__post_init__``                  :func:`apply_engine_config`
``VllmConfig.use_v2_model_runner``            :func:`apply_engine_config`
``InputProcessor._validate_params``           :func:`apply_front_end`
``BeamSearchParams.configure_logprobs`` (0.33)  :func:`apply_beam_allowlist_guard`
vLLM's stream loggers (a filter)              :func:`apply_quiet_stream_refusals`
MRV1 ``GPUModelRunner.__init__``,             :func:`apply_runner` (``RUNNERS[0]``)
``initialize_kv_cache``; module name
``Sampler`` while ``__init__`` builds it
MRV2 ``GPUModelRunner.__init__``,             :func:`apply_runner` (``RUNNERS[1]``)
``load_model``, ``initialize_kv_cache``;
module name ``Sampler`` while ``load_model``
builds it
MRV1 / MRV2 ``GPUModelRunner.execute_model``  :func:`apply_runner` (pipeline stages)
``Executor.get_kv_cache_specs``              :func:`apply_worker_check`
MRV1 runner ``_bookkeeping_sync`` (instance)  :func:`apply_mrv1_rewind_guard`
``v1.sample.sampler.mixed_sample_eligible``   :func:`apply_mrv1_fused_sample_guard`
(0.33)
``CPU_ATTN`` / ``FLASH_ATTN`` /               :func:`apply_attention_capture`
``TRITON_ATTN`` impl ``forward``
MRV2 ``SamplingStates.add_request``           :func:`apply_neutral_sampling_states`
(instance)
============================================  ==========================================
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from . import vllm_api

logger = logging.getLogger("vllm.entropix")

#: Attribute set on every replacement: the path of the vLLM internal it replaces.
MARK = "__entropix_patch__"


# ----------------------------------------------------------------------------
# The one wrapping helper
# ----------------------------------------------------------------------------
def _parts(raw):
    """(function, rebuild) of a class attribute: staticmethod, classmethod,
    property (its getter) or a plain function / bound method."""
    if isinstance(raw, staticmethod):
        return raw.__func__, staticmethod
    if isinstance(raw, classmethod):
        return raw.__func__, classmethod
    if isinstance(raw, property):
        return raw.fget, lambda f: property(f, raw.fset, raw.fdel, raw.__doc__)
    return raw, lambda f: f


def _raw(owner, attr: str):
    if isinstance(owner, type):
        for c in owner.__mro__:  # where it is defined (a descriptor as it is)
            if attr in c.__dict__:
                return c.__dict__[attr]
    return getattr(owner, attr)


def patched(obj) -> bool:
    """Whether a function (or the getter of a property) is one of ours."""
    fn, _ = _parts(obj)
    return getattr(fn, MARK, None) is not None


def wrap(owner, attr: str, make: Callable, path: str) -> bool:
    """Replace ``owner.<attr>`` by ``make(original)`` unless already ours.

    ``path``: the vLLM internal this is (``module:Qual.name``, an entry of
    ``vllm_api.INTERNALS``); the running series must have it, else nothing
    changes and False is returned. The replacement keeps the original's kind
    (staticmethod, classmethod, property getter, function) and carries
    ``__wrapped__`` (the original) and :data:`MARK` (``path``).
    """
    if not vllm_api.series_has(path):
        return False
    raw = _raw(owner, attr)
    fn, rebuild = _parts(raw)
    if getattr(fn, MARK, None) is not None:
        return True
    new = make(fn)
    new.__wrapped__ = fn
    setattr(new, MARK, path)
    for name in ("__name__", "__qualname__", "__doc__", "__module__"):
        if hasattr(fn, name):
            try:
                setattr(new, name, getattr(fn, name))
            except (AttributeError, TypeError):
                pass
    setattr(owner, attr, rebuild(new))
    return True


def original(owner, attr: str):
    """The vLLM function under our replacement of ``owner.<attr>`` (the
    property's getter for a property)."""
    fn, _ = _parts(_raw(owner, attr))
    while getattr(fn, MARK, None) is not None:
        fn = fn.__wrapped__
    return fn


# ----------------------------------------------------------------------------
# CLI, engine configuration, front end
# ----------------------------------------------------------------------------
_ARGS = "vllm.engine.arg_utils:EngineArgs"


def apply_cli(add_flag: Callable, flag_into: Callable) -> None:
    """``EngineArgs.add_cli_args`` returns ``add_flag(parser)``;
    ``EngineArgs.from_cli_args`` returns ``flag_into(engine_args, args)``
    (``plugin``: the ``--sampler`` flag)."""
    EngineArgs = vllm_api.engine_args_cls()

    def make_add(orig):
        def add_cli_args(parser, *args, **kwargs):
            return add_flag(orig(parser, *args, **kwargs))
        return add_cli_args

    def make_from(orig):
        def from_cli_args(cls, args):
            return flag_into(orig(cls, args), args)
        return from_cli_args

    wrap(EngineArgs, "add_cli_args", make_add, f"{_ARGS}.add_cli_args")
    wrap(EngineArgs, "from_cli_args", make_from, f"{_ARGS}.from_cli_args")


def apply_engine_config(before: Callable, after: Callable, use_v2: Callable) -> None:
    """``VllmConfig.__post_init__`` calls ``before(config)``, vLLM's own, then
    ``after(config)``; ``VllmConfig.use_v2_model_runner`` is
    ``use_v2(config, vllm_answer)`` (``engine``: checks, adjustments, the
    runner choice)."""
    VllmConfig = vllm_api.vllm_config_cls()

    def make_post_init(orig):
        def __post_init__(self, *args, **kwargs):
            before(self)
            orig(self, *args, **kwargs)
            after(self)
        return __post_init__

    def make_use_v2(orig):
        def use_v2_model_runner(self):
            return use_v2(self, orig(self))
        return use_v2_model_runner

    wrap(VllmConfig, "__post_init__", make_post_init, "vllm.config:VllmConfig.__post_init__")
    wrap(VllmConfig, "use_v2_model_runner", make_use_v2,
         "vllm.config:VllmConfig.use_v2_model_runner")


def vllm_runner_choice(vllm_config) -> bool:
    """vLLM's own ``use_v2_model_runner`` for this engine (ours unwrapped)."""
    return bool(original(type(vllm_config), "use_v2_model_runner")(vllm_config))


def apply_front_end(before: Callable, after: Callable) -> None:
    """``InputProcessor._validate_params(params)`` calls
    ``before(vllm_config, params)``, vLLM's own, then ``after(processor,
    params)`` (``plugin``: MRV2-only requests refused, Entropix keys validated)."""
    InputProcessor = vllm_api.input_processor_cls()

    def make(orig):
        def _validate_params(self, params, *args, **kwargs):
            before(self.vllm_config, params)
            out = orig(self, params, *args, **kwargs)
            after(self, params)
            return out
        return _validate_params

    wrap(InputProcessor, "_validate_params", make,
         "vllm.v1.engine.input_processor:InputProcessor._validate_params")


def apply_beam_allowlist_guard(refusal: Callable, cls=None) -> bool:
    """0.33: ``BeamSearchParams.configure_logprobs(sampling_params, config)``
    refuses an ``allowed_token_ids`` beam search unless the engine runs MRV2;
    ours raises first, HTTP 400 naming why (``refusal(config)``: a message, or
    None and vLLM's own check runs). 0.32 has no beam allowlists: nothing to
    patch (False). ``cls``: the class to patch (default the running vLLM's;
    tests pass 0.33's)."""
    path = "vllm.sampling_params:BeamSearchParams.configure_logprobs"
    if not vllm_api.series_has(path):
        return False
    error = vllm_api.validation_error_cls()

    def make(orig):
        def configure_logprobs(self, sampling_params, config, *args, **kwargs):
            if getattr(self, "allowed_token_ids", None) is not None:
                why = refusal(config)
                if why is not None:
                    raise error(why, parameter="allowed_token_ids",
                                value=self.allowed_token_ids)
            return orig(self, sampling_params, config, *args, **kwargs)
        return configure_logprobs

    return wrap(cls if cls is not None else vllm_api.beam_search_params_cls(),
                "configure_logprobs", make, path)


def apply_quiet_stream_refusals(filter_cls) -> None:
    """A ``filter_cls`` (``plugin.QuietRefusals``) on vLLM's stream loggers (a
    refusal logged once the stream has begun: one line, no traceback)."""
    for name in vllm_api.STREAM_ERROR_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, filter_cls) for f in log.filters):
            log.addFilter(filter_cls())


# ----------------------------------------------------------------------------
# Model runners: MRV1 and MRV2 the same way
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunnerSpec:
    """How one model runner builds its sampler, and which is ours."""

    name: str
    module: str                    # vLLM's runner module (vllm_api.MRV1 / MRV2)
    build_method: str              # the runner method that instantiates ``Sampler``
    sampler_module: str            # ours (in this package), holding the class
    sampler_class: str


RUNNERS = (
    RunnerSpec("MRV1", vllm_api.MRV1, "__init__", "mrv1", "EntropixSamplerV1"),
    RunnerSpec("MRV2", vllm_api.MRV2, "load_model", "mrv2", "EntropixSamplerV2"),
)


def sampler_class(spec: RunnerSpec):
    """Our sampler class for ``spec`` (imports its module: after the probe)."""
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{spec.sampler_module}"),
                   spec.sampler_class)


@contextlib.contextmanager
def rebound_sampler(runner_mod, sampler_cls):
    """While the block runs, the runner module's name ``Sampler`` is ``sampler_cls``
    (the runner instantiates ``Sampler(...)`` by that name)."""
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


@dataclass(frozen=True)
class WorkerHooks:
    """What a runner of an Entropix engine calls (``engine.worker_hooks``)."""

    enabled: Callable          # vllm_config -> bool: an Entropix engine?
    start: Callable            # (vllm_config, device) -> runtime, before the runner is built
    kv_cache_bound: Callable   # () -> None, once the KV cache is bound (not when profiling)
    # (runner, run, scheduler_output, intermediate_tensors) -> output, around
    # execute_model; run(intermediate_tensors) is vLLM's (pipeline stages)
    pipeline_step: Optional[Callable] = None


def apply_runner(spec: RunnerSpec, hooks: WorkerHooks) -> bool:
    """Wrap ``spec``'s ``GPUModelRunner`` (idempotent); False when the runner
    module does not import in this build (e.g. MRV2 without Triton).

    ``__init__``: an Entropix engine's worker gets its runtime first
    (``hooks.start``); the build method runs with ``Sampler`` rebound to ours,
    which is then checked and bound (MRV1: and the rewind guard);
    ``initialize_kv_cache``: ``hooks.kv_cache_bound`` (the capture's buffers,
    before vLLM captures CUDA graphs); ``execute_model``: through
    ``hooks.pipeline_step`` (the attention figures between pipeline stages;
    MRV1: a later stage's receive buffer made if vLLM's warm-up, which makes
    it, did not run: ``vllm_api.make_pp_receive_buffer``).
    """
    runner_mod = vllm_api.runner_module(spec.module)
    if runner_mod is None:
        logger.debug("Entropix: vLLM's %s runner is not importable here; not patched", spec.name)
        return False
    cls = runner_mod.GPUModelRunner
    path = f"{spec.module}:GPUModelRunner"

    def make_build(orig):
        def build(self, *args, **kwargs):
            runtime = getattr(self, "_entropix_runtime", None)
            if runtime is None:
                return orig(self, *args, **kwargs)
            ours = sampler_class(spec)
            with rebound_sampler(runner_mod, ours):
                out = orig(self, *args, **kwargs)
            bind_runner_sampler(self, runtime, ours, f"vLLM's {spec.name} runner")
            if spec.module == vllm_api.MRV1:
                apply_mrv1_rewind_guard(self)
            return out
        return build

    def make_init(orig):
        body = make_build(orig) if spec.build_method == "__init__" else orig

        def __init__(self, vllm_config, device, *args, **kwargs):
            if hooks.enabled(vllm_config):
                self._entropix_runtime = hooks.start(vllm_config, device)
            return body(self, vllm_config, device, *args, **kwargs)
        return __init__

    def make_kv(orig):
        def initialize_kv_cache(self, kv_cache_config, is_profiling=False, *args, **kwargs):
            out = orig(self, kv_cache_config, is_profiling, *args, **kwargs)
            if getattr(self, "_entropix_runtime", None) is not None and not is_profiling:
                hooks.kv_cache_bound()
            return out
        return initialize_kv_cache

    def make_exec(orig):
        def execute_model(self, scheduler_output, intermediate_tensors=None, *args, **kwargs):
            if (getattr(self, "_entropix_runtime", None) is None or hooks.pipeline_step is None
                    or kwargs.get("dummy_run")):   # MRV2's warm-up runs: nothing is sent
                return orig(self, scheduler_output, intermediate_tensors, *args, **kwargs)
            if intermediate_tensors is not None and spec.module == vllm_api.MRV1:
                vllm_api.make_pp_receive_buffer(self)
            return hooks.pipeline_step(
                self, lambda it: orig(self, scheduler_output, it, *args, **kwargs),
                scheduler_output, intermediate_tensors)
        return execute_model

    wrap(cls, "__init__", make_init, f"{path}.__init__")
    wrap(cls, "execute_model", make_exec, f"{path}.execute_model")
    if spec.build_method != "__init__":
        wrap(cls, spec.build_method, make_build, f"{path}.{spec.build_method}")
    wrap(cls, "initialize_kv_cache", make_kv, f"{path}.initialize_kv_cache")
    return True


def apply_worker_check(check: Callable) -> None:
    """``Executor.get_kv_cache_specs`` (the engine core's first call to its
    workers once they are built, every executor) calls ``check(executor)``
    first (``engine.check_workers``: every worker runs the plugin)."""
    def make(orig):
        def get_kv_cache_specs(self, *args, **kwargs):
            check(self)
            return orig(self, *args, **kwargs)
        return get_kv_cache_specs

    wrap(vllm_api.executor_cls(), "get_kv_cache_specs", make,
         "vllm.v1.executor.abstract:Executor.get_kv_cache_specs")


def discarded_rows(runner):
    """MRV1: rows of the runner's last step whose sample is discarded (host)."""
    import numpy as np

    n = runner.input_batch.num_reqs
    return np.nonzero(runner.discard_request_mask.np[:n])[0]


def apply_mrv1_rewind_guard(runner) -> bool:
    """MRV1 runner (instance): vLLM's ``_bookkeeping_sync`` rewinds, with
    ``set_offset``, the generator of every row whose sample is discarded; the
    Entropix sampler already left those generators as they were before the
    step (``mrv1.py``), and CPU generators would raise. Their generators are
    hidden from it while it runs."""
    def make(orig):
        def _bookkeeping_sync(*args, **kwargs):
            gens = runner.input_batch.generators
            hidden = {int(i): gens.pop(int(i)) for i in discarded_rows(runner)
                      if int(i) in gens}
            try:
                return orig(*args, **kwargs)
            finally:
                gens.update(hidden)
        return _bookkeeping_sync

    return wrap(runner, "_bookkeeping_sync", make,
                f"{vllm_api.MRV1}:GPUModelRunner._bookkeeping_sync")


def apply_mrv1_fused_sample_guard(active: Callable[[], bool], mod=None) -> bool:
    """0.33: ``v1/sample/sampler.py``'s ``mixed_sample_eligible`` lets
    ``Sampler.forward`` skip ``sample()`` (a fused ROCm kernel), which would
    bypass Entropix: it answers False while ``active()`` (``plugin``: an
    Entropix sampler is sampling). 0.32 has no such path (False). ``mod``: the
    module to patch (default the running vLLM's; tests pass 0.33's)."""
    path = "vllm.v1.sample.sampler:mixed_sample_eligible"
    if not vllm_api.series_has(path):
        return False

    def make(orig):
        def mixed_sample_eligible(*args, **kwargs):
            return False if active() else orig(*args, **kwargs)
        return mixed_sample_eligible

    return wrap(mod if mod is not None else vllm_api.module_of(path), "mixed_sample_eligible",
                make, path)


# ----------------------------------------------------------------------------
# Attention and MRV2's sampling states
# ----------------------------------------------------------------------------
_FORWARD_ARGS = ("layer", "query", "key", "value", "kv_cache", "attn_metadata")


def apply_attention_capture(after_forward: Callable) -> list:
    """``forward`` of the supported backends' impl classes (class level: the
    attention custom op looks ``layer.impl.forward`` up at run time) calls
    ``after_forward(impl, layer, query, key, kv_cache, attn_metadata)`` after
    vLLM's attention (``attention.after_forward``: the capture). Returns the
    backends wrapped (those built into this vLLM)."""

    def make(orig):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            out = orig(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            after_forward(self, layer, query, key, kv_cache, attn_metadata)
            return out
        return forward

    done = []
    for backend in vllm_api.ATTENTION_BACKENDS:
        try:
            cls = vllm_api.attention_impl_cls(backend)
        except Exception as e:  # backend not built into this vLLM (e.g. CUDA ones on CPU)
            logger.debug("Entropix: attention backend %s not importable: %s", backend, e)
            continue
        owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
        module, name = vllm_api.ATTENTION_BACKENDS[backend]
        wrap(owner, "forward", make, f"{module}:{name}.forward")
        done.append(backend)
    return done


def apply_neutral_sampling_states(states, substitute: Callable) -> bool:
    """MRV2 ``SamplingStates`` (instance): ``add_request(req_idx, params)``
    receives ``substitute(params)`` (``mrv2``: a temperature-1 copy for
    Entropix requests), the sampler's other states the request's own."""

    def make(orig):
        def add_request(req_idx, sampling_params, *args, **kwargs):
            return orig(req_idx, substitute(sampling_params), *args, **kwargs)
        return add_request

    return wrap(states, "add_request", make,
                "vllm.v1.worker.gpu.sample.states:SamplingStates.add_request")
