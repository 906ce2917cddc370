"""Every check and adjustment an Entropix engine makes to vLLM's configuration,
and its runner choice.

Called by the plugin's ``VllmConfig.__post_init__`` wrapper (every process that
builds the engine configuration: front end, engine core) and again, idempotent,
by the runner hook in each worker before its model runner is built
(:func:`prepare`):

* :func:`check`: refusals, each naming the setting: a bad ``entropix``
  section (``config.py``), speculative decoding, context parallelism,
  micro-batching, pipeline parallelism under the ``external_launcher``
  executor (pipeline parallelism itself is supported: ``attention.py``);
* :func:`adjust_before_vllm` (before vLLM's own ``__post_init__``, whose
  runner validation would otherwise refuse them): batch-sharded sampling and
  dual-batch overlap off, one log line each;
* the engine's CUDA-graph mode is kept: the attention capture is tensor ops
  into persistent buffers, recorded into full graphs and replayed with them
  (``attention.py``);
* :func:`choose_runner`: which model runner an Entropix engine runs (below),
  and :func:`v2_refusal`: the message for a request only MRV2 can serve.

Runner choice (GPU; the CPU build always runs MRV1, its only runner without
Triton): with ``VLLM_USE_V2_MODEL_RUNNER`` set, the user's choice; otherwise,
where vLLM would run MRV2, the Entropix engine runs MRV1 (its Entropix sampler
is the one tested end to end) unless vLLM says the V1 runner cannot serve the
engine (``vllm_api.v1_runner_blockers``: e.g. 0.33's "Model Runner V1 does not
support: Step5", HiSparse, watermarking), in which case it keeps MRV2 and logs
why. A request that needs MRV2 (``prompt_logprob_token_ids``; 0.33's beam
search with ``allowed_token_ids``) on an engine the plugin moved to MRV1 is
refused with HTTP 400 naming why and the setting that serves it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..config import EngineConfig
from ..model_id import ModelSource
from . import vllm_api

logger = logging.getLogger("vllm.entropix")



# ----------------------------------------------------------------------------
# Is Entropix on, and with which configuration
# ----------------------------------------------------------------------------
def sampler_of(additional_config) -> str:
    if not additional_config:
        return "default"
    return additional_config.get("sampler", "default")


def entropix_enabled(vllm_config) -> bool:
    return sampler_of(getattr(vllm_config, "additional_config", None)) == "entropix"


@functools.lru_cache(maxsize=8)
def _engine_config_cached(key: str, model: Optional[ModelSource]) -> EngineConfig:
    return EngineConfig.from_additional_config(json.loads(key), model=model)


def engine_config(vllm_config) -> EngineConfig:
    """The parsed :class:`~entropix_vllm.config.EngineConfig` of an engine
    (raises ``EntropixConfigError`` naming a bad key); its ``auto`` preset is
    the one made for the engine's model (``config.choose_auto``)."""
    ac = getattr(vllm_config, "additional_config", None) or {}
    sub = {k: ac[k] for k in ("sampler", "entropix") if k in ac}
    return _engine_config_cached(json.dumps(sub, sort_keys=True, default=str),
                                 ModelSource.of_vllm_config(vllm_config))


# ----------------------------------------------------------------------------
# Checks and adjustments
# ----------------------------------------------------------------------------
class EntropixEngineError(ValueError):
    """This engine setup cannot run the Entropix sampler; the message says why."""


def check(vllm_config) -> None:
    """Refuse what an Entropix engine cannot run (each message names the setting)."""
    engine_config(vllm_config)  # EntropixConfigError naming the key
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise EntropixEngineError(
            "The Entropix sampler (--sampler entropix) cannot run with speculative "
            "decoding: vLLM samples draft tokens with its rejection sampler, which "
            "Entropix does not replace. Remove --speculative-config or the sampler flag.")
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is None:
        return
    if (getattr(pc, "pipeline_parallel_size", 1) > 1
            and getattr(pc, "distributed_executor_backend", None) == "external_launcher"):
        # There every pipeline stage samples (vLLM broadcasts the logits to all
        # of them); the attention figures reach only the last one.
        raise EntropixEngineError(
            "The Entropix sampler does not support pipeline parallelism under the "
            f"external_launcher executor (pipeline_parallel_size={pc.pipeline_parallel_size}, "
            "distributed_executor_backend=external_launcher): every stage samples there; use "
            "vLLM's mp or ray executor, or tensor parallelism")
    for attr in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, attr, 1) > 1:
            raise EntropixEngineError(
                "Entropix attention figures do not support context parallelism "
                f"({attr}={getattr(pc, attr)})")
    if getattr(pc, "ubatch_size", 0) > 1:
        raise EntropixEngineError(
            "Entropix attention figures do not support micro-batching "
            f"(ubatch_size={pc.ubatch_size})")


def adjust_before_vllm(vllm_config) -> List[str]:
    """Switch off what reorders or splits the sampler's rows; returns the log lines."""
    changes = []
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is not None and getattr(pc, "enable_batch_sharded_sampling", False):
        pc.enable_batch_sharded_sampling = False
        changes.append("Entropix: batch-sharded sampling reorders the logits rows; turned off")
    if pc is not None and getattr(pc, "enable_dbo", False):
        # Micro-batches run the chosen layer once per micro-batch, each with a
        # part of the requests.
        pc.enable_dbo = False
        changes.append("Entropix: dual-batch overlap splits the forward pass into "
                       "micro-batches; turned off")
    for msg in changes:
        logger.warning(msg)
    return changes


def before_vllm_post_init(vllm_config) -> None:
    """Before vLLM's ``VllmConfig.__post_init__`` (``patches.apply_engine_config``)."""
    if entropix_enabled(vllm_config):
        adjust_before_vllm(vllm_config)


def after_vllm_post_init(vllm_config) -> None:
    """After vLLM's ``VllmConfig.__post_init__``: the sections validated (a wrong
    ``sampler`` value too) and, for an Entropix engine, :func:`check`."""
    engine_config(vllm_config)
    if entropix_enabled(vllm_config):
        check(vllm_config)


def prepare(vllm_config) -> List[str]:
    """:func:`check` and the adjustments (idempotent); the worker's entry."""
    check(vllm_config)
    return adjust_before_vllm(vllm_config)


# ----------------------------------------------------------------------------
# Runner choice
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunnerChoice:
    """Which model runner an Entropix engine runs, who decided, and why."""

    v2: bool
    by: str       # "user" (VLLM_USE_V2_MODEL_RUNNER), "vllm" (vLLM's own choice), "plugin"
    reason: str

    @property
    def name(self) -> str:
        return "MRV2" if self.v2 else "MRV1"


def choose_runner(vllm_v2: bool, env_value: Optional[str],
                  v1_blockers: Sequence[str]) -> RunnerChoice:
    """The runner of an Entropix engine (module docstring): ``vllm_v2`` is
    vLLM's own choice, ``env_value`` the ``VLLM_USE_V2_MODEL_RUNNER`` setting
    (None: unset), ``v1_blockers`` what vLLM says MRV1 cannot serve."""
    if env_value is not None:
        return RunnerChoice(vllm_v2, "user", f"{vllm_api.V2_RUNNER_ENV}={env_value}")
    if not vllm_v2:
        return RunnerChoice(False, "vllm", "vLLM runs its V1 model runner here")
    if v1_blockers:
        return RunnerChoice(True, "vllm", "vLLM's V1 model runner cannot serve this engine "
                                          f"({', '.join(v1_blockers)})")
    return RunnerChoice(False, "plugin", "its Entropix sampler is the one tested end to end; "
                                         f"{vllm_api.V2_RUNNER_ENV}=1 selects the MRV2 Entropix sampler")


_LOGGED: set = set()


def runner_choice(vllm_config, vllm_v2: Optional[bool] = None) -> RunnerChoice:
    """:func:`choose_runner` for this engine (logged once per process and
    choice); ``vllm_v2``: vLLM's own choice (default: asked of vLLM)."""
    if vllm_v2 is None:
        from .patches import vllm_runner_choice
        vllm_v2 = vllm_runner_choice(vllm_config)
    env = os.environ.get(vllm_api.V2_RUNNER_ENV)
    blockers = vllm_api.v1_runner_blockers(vllm_config) if (vllm_v2 and env is None) else []
    choice = choose_runner(vllm_v2, env, blockers)
    key = (choice.v2, choice.by, choice.reason)
    if key not in _LOGGED and choice.by != "user":
        _LOGGED.add(key)
        if choice.by == "plugin":
            logger.info("Entropix: this engine runs vLLM's V1 model runner (MRV1): %s",
                        choice.reason)
        elif choice.v2:
            logger.warning("Entropix: this engine runs vLLM's V2 model runner (MRV2) with the "
                           "MRV2 Entropix sampler: %s", choice.reason)
    return choice


def use_v2_model_runner(vllm_config, vllm_v2: bool) -> bool:
    """``VllmConfig.use_v2_model_runner`` as patched: vLLM's answer ``vllm_v2``
    unless the engine runs Entropix."""
    if not entropix_enabled(vllm_config):
        return vllm_v2
    return runner_choice(vllm_config, vllm_v2).v2


def v2_refusal(vllm_config, what: str, vllm_v2: Optional[bool] = None) -> Optional[str]:
    """The message refusing ``what`` (a request feature only MRV2 serves) when
    the plugin moved this Entropix engine to MRV1; None otherwise (vLLM's own
    check, if any, applies). ``vllm_v2``: vLLM's own choice (default: asked)."""
    if not entropix_enabled(vllm_config):
        return None
    choice = runner_choice(vllm_config, vllm_v2)
    if choice.v2 or choice.by != "plugin":
        return None
    return (f"{what} needs vLLM's V2 model runner, but this Entropix engine runs the V1 "
            f"runner (the plugin's choice on GPUs: {choice.reason}); restart the server with "
            f"{vllm_api.V2_RUNNER_ENV}=1 to serve it")


# ----------------------------------------------------------------------------
# Every worker runs the plugin (clusters: Ray workers, other nodes)
# ----------------------------------------------------------------------------
def worker_runs_entropix(worker) -> bool:
    """In a worker (``collective_rpc``): its model runner was built by the
    plugin (an Entropix runtime is attached)."""
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "_entropix_runtime", None) is not None


def check_workers(executor) -> None:
    """In the engine core, once the workers are built (``patches.apply_worker_check``):
    an Entropix engine whose workers do not all run the plugin stops here,
    naming them. vLLM loads the plugin in each worker through its
    ``vllm.general_plugins`` entry point; a node (a Ray worker) whose Python
    lacks the installed package, or has it only on its path (Ray's
    ``py_modules`` / ``working_dir``, no entry point), would otherwise sample
    with vLLM's own sampler, silently."""
    if not entropix_enabled(getattr(executor, "vllm_config", None)):
        return
    why = None
    try:
        states = executor.collective_rpc(worker_runs_entropix)
    except Exception as e:  # noqa: BLE001 - e.g. the package not importable there
        states, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    missing = ([i for i, ok in enumerate(states) if not ok] if states is not None else None)
    if states is not None and not missing:
        return
    ranks = "some workers" if missing is None else f"worker(s) {missing} of {len(states)}"
    raise EntropixEngineError(
        f"The Entropix sampler (--sampler entropix) is not loaded in {ranks}"
        f"{f' ({why})' if why else ''}: install entropix-vllm into the Python environment "
        "of every node (the same image everywhere, or Ray's runtime_env 'pip' with the "
        "package); vLLM loads it through its vllm.general_plugins entry point, which "
        "py_modules / working_dir do not provide, and VLLM_PLUGINS, if set, must name "
        "'entropix'")


# ----------------------------------------------------------------------------
# Worker start-up
# ----------------------------------------------------------------------------
def worker_hooks():
    """What the patched model runners call (``patches.WorkerHooks``)."""
    from . import attention, patches

    return patches.WorkerHooks(enabled=entropix_enabled, start=start_worker,
                               kv_cache_bound=attention.prepare,
                               pipeline_step=attention.pipeline_step)


def start_worker(vllm_config, device) -> "EntropixRuntime":  # noqa: F821
    """Before a model runner of an Entropix engine is built: :func:`prepare`,
    the engine's :class:`~entropix_vllm.integration.runtime.EntropixRuntime`
    and the attention capture; logs which backend runs each op."""
    import torch

    from .. import ops
    from . import attention, patches
    from .runtime import EntropixRuntime

    prepare(vllm_config)
    pp_rank, pp_size = vllm_api.pp_rank_size()
    runtime = EntropixRuntime(vllm_config, tp_rank=vllm_api.tp_rank(),
                              last_stage=pp_rank == pp_size - 1)
    patches.apply_attention_capture(attention.after_forward)
    attention.install(vllm_config, runtime.options.attn_layer)
    if runtime.lead:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        logger.info("Entropix ops on %s: %s", dev.type, ops.describe(dev.type))
    return runtime
