"""Attention figures from vLLM's forward pass (SPEC section 2), the vLLM side.

Every vLLM internal read here is named in ``vllm_api.INTERNALS`` (attention
section): the ``Attention`` layer, the three backends' impl classes and
metadata, the forward context, the TP all-gather.

How it works
------------
* ``patches.apply_attention_capture`` wraps ``forward`` of the supported
  attention backends' impl classes at class level. The attention custom op
  (``unified_attention_with_output``) looks up ``layer.impl.forward`` at run
  time, so the wrapper sees every call of every layer; :func:`after_forward`
  acts only for the chosen layer and costs one string comparison for the
  others.
* The chosen layer: ``attn_layer`` indexes the model's decoder self-attention
  layers (``Attention`` modules with ``attn_type == "decoder"``) in the order
  the model builds them, which is the transformer layer order
  (``model.layers.{i}.self_attn.attn``); ``-1`` is the last. It is resolved at
  the first forward pass (the start-up profiling run), where an unsupported
  backend, a KV-sharing layer or an out-of-range index raise a clear error.
* After the original ``forward`` of the chosen layer, the wrapper reads the
  layer's metadata (``query_start_loc``, ``seq_lens``, ``block_table``; the
  slot mapping of the forward context), takes each request's last query row
  (row ``query_start_loc[i+1] - 1`` of the layer's query input ``[tokens, H, D]``,
  after rotary embedding) into a persistent buffer ``[max_num_seqs, H, D]`` and
  computes the four figures with :func:`entropix_vllm.ops.paged_attention_stats`
  against the paged keys, with the layer's own ``impl.scale``. The figures go
  to a persistent ``[4, max_num_seqs]`` float32 buffer. All of it is tensor ops
  on the metadata's device tensors: no ``.item()``, no per-request Python loop.
* Keys: on ``CPU_ATTN`` the cache pages are packed per instruction set, so the
  plugin keeps its own paged copy of the chosen layer's keys, flat
  ``[num_blocks * block_size + 1, H_kv, D]`` (the last row takes padding slots,
  ``slot < 0``), allocated at the first real forward with the number of blocks
  of the layer's KV cache and written with ``index_copy_`` at the same slot
  mapping as vLLM's own cache update. ``FLASH_ATTN`` and ``TRITON_ATTN`` (CUDA)
  are read in place as the strided view ``kv_cache.transpose(1, 2)
  .split(head_size, -1)[0]`` = ``[num_blocks, block_size, H_kv, D]`` (the same
  view those backends hand to their kernels); with a quantized KV cache
  (``kv_cache_dtype != "auto"``) or tensor parallelism they use the copy too
  (one layer's keys of all heads; not counted in vLLM's KV-cache memory
  budget, its size is logged).
* Alignment with the logits rows: with both model runners and no speculative
  decoding the sampler's logits rows are ``hidden_states[query_start_loc[1:] - 1]``,
  one row per scheduled request in ``query_start_loc`` order, partial-prefill
  requests included (their samples are discarded by the runner). The capture
  uses the same rows, so figure row ``i`` belongs to logits row ``i``; a
  partial-prefill row gets the figures of its chunk's last position. MRV2 may
  pad the request count: only the first ``num_rows`` figures are returned.
  MRV2's batch-sharded sampling (rows reordered per TP rank) is switched off by
  ``engine.adjust_before_vllm``.
* Micro-batching (dual-batch overlap) would run the chosen layer once per
  micro-batch: ``engine.py`` turns DBO off and refuses ``ubatch_size > 1``.
* Tensor parallelism: each rank holds ``H / tp`` query heads and its KV heads.
  The chosen layer all-gathers (over vLLM's TP group) its query rows and its new
  keys along the head axis, in rank order, which is the model's head order, so
  every rank keeps the keys of all heads for that one layer and computes the
  figures over all heads (identical on every rank, as SPEC section 2 asks).
* Pipeline parallelism: each stage holds a range of the transformer layers
  (``vllm_api.pp_layer_range``, vLLM's own split) and resolves ``attn_layer``
  against the whole model: the attention layers are counted by their layer
  index (one decoder self-attention layer per transformer layer, named by its
  index; another model is refused at start-up). The stage holding the chosen
  layer captures as above; the figures of its requests (``[4, num_reqs]``)
  then ride with the intermediate tensors the stage sends the next one, under
  :data:`PP_KEY` (:func:`pipeline_step`, around each runner's
  ``execute_model``): a middle stage passes them on, the last stage copies
  them into its own buffer before its forward pass and its sampler reads them
  there. Every stage runs the same scheduled requests in the same row order,
  so row ``i`` stays request ``i``; with PP x TP every rank of the chosen
  stage holds the same figures, so every rank of the last stage receives them.
* CUDA graphs: the engine's mode is kept. With ``FULL_AND_PIECEWISE`` /
  ``FULL`` / ``FULL_DECODE_ONLY`` the decode forward pass is captured once per
  batch size and replayed, and the wrapper's Python runs only at capture. So
  everything it does per step is tensor work on persistent buffers sized by
  capacity (``max_num_seqs`` rows, ``max_num_batched_tokens`` slots), allocated
  once the KV cache is bound (:func:`prepare`, before vLLM captures), with the
  rows, queries and figures written in place, the statistics' grids sized by
  the block table's capacity (programs past a request's length exit at once)
  and no host sync: a replay recomputes the figures of the replayed batch.
  What the sampler cannot learn on a replay is the row count of the last
  forward pass, so with full graphs it reads the buffer's first ``num_rows``
  rows unconditionally (one per scheduled request; pad rows of a padded batch
  have ``seq_len`` 0 and zero figures). CPU has no CUDA graphs; its default
  compilation (``DYNAMO_TRACE_ONCE`` + inductor) keeps the attention custom op
  opaque, so the wrapper runs eagerly every step.

Supported: ``CPU_ATTN`` (CPU), ``FLASH_ATTN`` and ``TRITON_ATTN`` (CUDA).
Anything else (FlashInfer, MLA backends, FlexAttention, ROCm backends, ...)
raises at start-up naming the backend and the supported ones.
Not supported (start-up error, ``engine.check``): decode / prefill context
parallelism, micro-batching, pipeline parallelism under the ``external_launcher``
executor (every stage samples there); on 0.33, a model that writes the KV
cache itself before attention (``Attention.kv_cache_update_bypass``) when the
plugin needs its key copy (CPU, TP, quantized caches): its keys never reach the
backend. Figures follow SPEC section 2 literally:
plain scaled dot-product scores over all ``L`` positions, whatever sliding
window, ALiBi or logit soft-capping the model applies (a warning says so once).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..contract import AttnStats
from . import vllm_api

# Under the "vllm" logger so that lines appear in vLLM's log with its handlers.
logger = logging.getLogger("vllm.entropix.attention")

_SUPPORTED = vllm_api.ATTENTION_BACKENDS
_DIRECT_READ = vllm_api.DIRECT_READ_BACKENDS



class AttentionCaptureError(RuntimeError):
    """The attention figures cannot be computed for this engine setup."""


def supported_backends() -> tuple:
    return tuple(_SUPPORTED)


# ----------------------------------------------------------------------------
# Capture state (one per process)
# ----------------------------------------------------------------------------
class _Buffers:
    """Persistent tensors of the capture, sized by capacity once (never per step).

    ``rows [cap]`` int64, ``q [cap, H, D]`` the gathered queries, ``stats [4, cap]``
    float32 the figures the sampler reads; with the key copy, ``key_flat``
    ``[num_blocks * block_size + 1, H_kv, D]`` (its paged view ``key_paged``),
    ``slots [max_tokens]`` int64 and ``neg [max_tokens]`` bool for the slot mapping;
    ``workspace``: the attention statistics' scratch (``ops``).
    """

    def __init__(self, cap: int, h: int, d: int, q_dtype, device):
        self.cap = cap
        self.rows = torch.zeros(cap, dtype=torch.int64, device=device)
        self.q = torch.zeros(cap, h, d, dtype=q_dtype, device=device)
        self.stats = torch.zeros(4, cap, dtype=torch.float32, device=device)
        self.key_flat: Optional[torch.Tensor] = None
        self.key_paged: Optional[torch.Tensor] = None
        self.trash_slot = 0
        self.slots: Optional[torch.Tensor] = None
        self.neg: Optional[torch.Tensor] = None
        self.workspace = None   # ops.attention_workspace, for cap rows of these heads


class _Capture:
    def __init__(self, vllm_config, attn_layer: int):
        self.vllm_config = vllm_config
        self.attn_layer = int(attn_layer)
        sc = getattr(vllm_config, "scheduler_config", None)
        self.max_num_seqs = int(getattr(sc, "max_num_seqs", 0) or 256)
        self.max_tokens = int(getattr(sc, "max_num_batched_tokens", 0) or 8192)
        pc = getattr(vllm_config, "parallel_config", None)
        self.tp_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        # Pipeline parallelism: this worker's stage; whether the chosen layer is
        # here (else its figures arrive with the intermediate tensors).
        self.pp_rank, self.pp_size = vllm_api.pp_rank_size()
        self.pp_last = self.pp_rank == self.pp_size - 1
        self.here = True
        self.carried: Optional[torch.Tensor] = None      # [4, cap] received figures
        self.carried_rows: Optional[int] = None
        # With full CUDA graphs a replayed forward pass runs none of this module's
        # Python: the sampler then cannot know the row count of the last forward
        # pass from here, and trusts the buffer (rows past the padded batch are
        # never read: the sampler reads one row per scheduled request).
        cc = getattr(vllm_config, "compilation_config", None)
        mode = getattr(cc, "cudagraph_mode", None)
        self.graphs = bool(mode is not None and hasattr(mode, "has_full_cudagraphs")
                           and mode.has_full_cudagraphs())
        self.layer_name: Optional[str] = None
        self.backend: Optional[str] = None
        self.use_copy = True
        self.buf: Optional[_Buffers] = None
        self.ops_backend = "auto"   # the figures' backend (tests: "triton" on CPU)
        # Rows of the last eager forward pass of the chosen layer (None: no figures yet).
        self.num_rows: Optional[int] = None

    # -- resolution of the chosen layer --------------------------------------
    def _layers(self, no_compile_layers=None) -> dict:
        layers = no_compile_layers
        if not layers:
            cc = getattr(self.vllm_config, "compilation_config", None)
            layers = getattr(cc, "static_forward_context", None) or {}
        return layers

    def resolve(self, no_compile_layers=None) -> str:
        if self.layer_name is not None:
            return self.layer_name
        # MLA layers count as attention layers (to name them in the error)
        Attention, kinds = vllm_api.attention_layer_classes()
        layers = self._layers(no_compile_layers)
        decoder = [name for name, mod in layers.items()
                   if isinstance(mod, kinds) and str(getattr(mod, "attn_type", "decoder")) in
                   ("decoder", "AttentionType.DECODER")]
        if not decoder:
            raise AttentionCaptureError(
                "Entropix attention figures: the model has no decoder self-attention layer "
                f"(supported backends: {', '.join(_SUPPORTED)}); attention-free models are "
                "not supported")
        if self.pp_size > 1:
            name = self._resolve_stage(decoder)
            if name is None:  # the chosen layer is on another stage
                return self.layer_name
        else:
            n = len(decoder)
            if not -n <= self.attn_layer < n:
                raise AttentionCaptureError(
                    f"Entropix: attn_layer={self.attn_layer} is out of range: the model has {n} "
                    f"attention layers (valid: {-n}..{n - 1})")
            name = decoder[self.attn_layer]
        layer = layers[name]
        backend = layer.get_attn_backend().get_name()
        if backend not in _SUPPORTED or not isinstance(layer, Attention):
            raise AttentionCaptureError(
                f"Entropix attention figures: attention backend {backend} (layer {name}) is not "
                f"supported; supported backends: {', '.join(_SUPPORTED)} "
                "(choose one with --attention-backend, or run without --sampler entropix)")
        cls_name = _SUPPORTED[backend][1]
        impl_cls = vllm_api.attention_impl_cls(backend)
        if not isinstance(layer.impl, impl_cls):
            raise AttentionCaptureError(
                f"Entropix attention figures: layer {name} uses {type(layer.impl).__name__}, "
                f"not {cls_name} of backend {backend}; not supported")
        if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
            raise AttentionCaptureError(
                f"Entropix attention figures: layer {name} shares the KV cache of "
                f"{layer.kv_sharing_target_layer_name}; choose another attn_layer")
        impl = layer.impl
        if (getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1))
                or getattr(impl, "alibi_slopes", None) is not None
                or (getattr(impl, "logits_soft_cap", None) or 0) != 0):
            logger.warning(
                "Entropix: layer %s uses a sliding window, ALiBi or logit soft-capping; the "
                "attention figures follow SPEC section 2 (plain scaled scores over all positions)",
                name)
        kv_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
        self.backend = backend
        self.use_copy = not (backend in _DIRECT_READ and self.tp_size == 1 and kv_dtype == "auto")
        if self.use_copy and vllm_api.layer_writes_kv_itself(layer):
            raise AttentionCaptureError(
                f"Entropix attention figures: layer {name} writes its KV cache before "
                "attention and passes no keys (kv_cache_update_bypass), and this setup "
                f"(backend {backend}, tp={self.tp_size}, kv_cache_dtype={kv_dtype}) needs the "
                "plugin's key copy; choose another attn_layer or run without --sampler entropix")
        self.layer_name = name
        logger.info("Entropix: attention figures from layer %s (backend %s, %s, tp=%d)", name,
                    backend, "plugin key copy" if self.use_copy else "KV cache read in place",
                    self.tp_size)
        return name

    def _resolve_stage(self, decoder) -> Optional[str]:
        """Pipeline parallelism: ``attn_layer`` over the whole model's layers;
        the chosen layer's name when this stage holds it, else None (then
        ``layer_name`` names where it is, a name no layer has)."""
        total = int(self.vllm_config.model_config.get_total_num_hidden_layers())
        start, end = vllm_api.pp_layer_range(total, self.pp_rank, self.pp_size)
        try:
            idx = [vllm_api.layer_index(n) for n in decoder]
        except ValueError:
            idx = None
        if idx != list(range(start, end)):
            raise AttentionCaptureError(
                "Entropix attention figures with pipeline parallelism "
                f"(pipeline_parallel_size={self.pp_size}) need one decoder self-attention layer "
                "per transformer layer, named by its index; pipeline stage "
                f"{self.pp_rank} holds layers {start}..{end - 1} but its attention layers are "
                f"{decoder[:4]}{' ...' if len(decoder) > 4 else ''}; run this model without "
                "pipeline parallelism or without --sampler entropix")
        if not -total <= self.attn_layer < total:
            raise AttentionCaptureError(
                f"Entropix: attn_layer={self.attn_layer} is out of range: the model has {total} "
                f"attention layers (valid: {-total}..{total - 1})")
        g = self.attn_layer % total
        if start <= g < end:
            self.here = True
            if not self.pp_last:
                logger.info("Entropix: attention figures from layer %d on this pipeline stage "
                            "(%d of %d), sent on with the intermediate tensors", g,
                            self.pp_rank, self.pp_size)
            return decoder[g - start]
        stage = next(r for r in range(self.pp_size)
                     if vllm_api.pp_layer_range(total, r, self.pp_size)[0] <= g
                     < vllm_api.pp_layer_range(total, r, self.pp_size)[1])
        self.here = False
        self.layer_name = f"<layer {g} on pipeline stage {stage}>"
        if self.pp_last:
            logger.info("Entropix: attention figures from layer %d, on pipeline stage %d of %d; "
                        "they reach this last stage with the intermediate tensors", g, stage,
                        self.pp_size)
        return None

    # -- buffers ---------------------------------------------------------------
    def prepare(self, layers=None) -> bool:
        """Resolve the layer and allocate every buffer now, eagerly (after the KV
        cache exists, before vLLM captures CUDA graphs). False when the layer has
        no KV cache yet (the buffers then come at the first forward pass)."""
        name = self.resolve(layers)
        layer = self._layers(layers).get(name)
        kv_cache = getattr(layer, "kv_cache", None)
        impl = getattr(layer, "impl", None)
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4 or impl is None:
            return False
        dtype = getattr(getattr(self.vllm_config, "model_config", None), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            return False
        h_kv_local = int(getattr(impl, "num_kv_heads", kv_cache.shape[1]))
        self._ensure_buffers(impl.num_heads * self.tp_size, impl.head_size, dtype,
                             kv_cache.device, h_kv_local, dtype, kv_cache)
        return True

    def _ensure_buffers(self, h: int, d: int, q_dtype, device, h_kv_local: int, k_dtype,
                        kv_cache: torch.Tensor) -> None:
        b = self.buf
        if b is None or b.q.shape[1:] != (h, d) or b.q.device != device or b.q.dtype != q_dtype:
            b = self.buf = _Buffers(self.max_num_seqs, h, d, q_dtype, device)
        # kv_cache logical shape: [num_blocks, H_kv_local, block_size, 2 * D].
        num_blocks, block_size = int(kv_cache.shape[0]), int(kv_cache.shape[2])
        h_kv = h_kv_local * self.tp_size
        if b.workspace is None:
            from ..ops import attention_workspace
            b.workspace = attention_workspace(b.cap, h, h_kv, device, backend=self.ops_backend)
        if self.use_copy and (b.key_paged is None
                              or b.key_paged.shape != (num_blocks, block_size, h_kv, d)):
            slots = num_blocks * block_size
            b.key_flat = torch.zeros(slots + 1, h_kv, d, dtype=k_dtype, device=device)
            b.key_paged = b.key_flat[:slots].view(num_blocks, block_size, h_kv, d)
            b.trash_slot = slots
            b.slots = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
            b.neg = torch.zeros(self.max_tokens, dtype=torch.bool, device=device)
            mib = b.key_flat.numel() * b.key_flat.element_size() / 2**20
            logger.info("Entropix: key copy of layer %s: %d blocks x %d x %d heads x %d (%.1f MiB)",
                        self.layer_name, num_blocks, block_size, h_kv, d, mib)

    # -- the capture proper ----------------------------------------------------
    def on_forward(self, impl, layer, query, key, kv_cache, md) -> None:
        """Runs after the chosen layer's attention, each eager step and once per
        CUDA-graph capture. Tensor ops into persistent buffers only: no host
        sync, no allocation sized by a per-step value (shapes are fixed for a
        captured batch size), so a replayed graph recomputes the figures."""
        if md is None:  # profiling / warm-up run without metadata: no figures
            self.num_rows = None
            return
        qsl = md.query_start_loc
        n = int(qsl.shape[0]) - 1  # a shape, not a host sync
        if n <= 0 or kv_cache is None or kv_cache.dim() != 4 or kv_cache.numel() == 0:
            # No request, or a run before the KV cache exists (start-up).
            self.num_rows = None
            return
        h_loc, d = impl.num_heads, impl.head_size
        if query.dim() == 2:
            query = query.view(query.shape[0], h_loc, d)
        if key is not None and key.dim() == 2:
            key = key.view(key.shape[0], -1, d)
        h_kv_local = int(key.shape[1]) if key is not None else int(kv_cache.shape[1])
        self._ensure_buffers(h_loc * self.tp_size, d, query.dtype, query.device, h_kv_local,
                             key.dtype if key is not None else query.dtype, kv_cache)
        b = self.buf
        if n > b.cap:
            _warn_once(f"Entropix: a forward pass with {n} requests exceeds max_num_seqs "
                       f"({b.cap}); no attention figures for it")
            self.num_rows = None
            return

        if self.use_copy and key is None:
            raise AttentionCaptureError(
                f"Entropix: layer {self.layer_name} received no keys; not supported")
        slots = self._slot_mapping(md) if self.use_copy else None
        self.compute(n, query, key, kv_cache, md.query_start_loc, md.block_table, md.seq_lens,
                     slots, float(impl.scale))
        self.num_rows = n

    def compute(self, n: int, query, key, kv_cache, query_start_loc, block_table, seq_lens,
                slot_mapping, scale: float) -> None:
        """The tensor work of one step, what a CUDA graph records: reads the
        step's tensors, writes only the persistent buffers, changes no Python
        state (:meth:`on_forward` does the bookkeeping around it)."""
        from ..ops import paged_attention_stats

        b = self.buf
        d = b.q.shape[2]
        # Each request's last query row (clamped so that padded requests of
        # zero length read a valid row; their seq_len 0 gives zero figures).
        rows = b.rows[:n]
        torch.sub(query_start_loc[1:n + 1], 1, out=rows)
        rows.clamp_(min=0)
        if self.tp_size > 1:
            q = vllm_api.tp_all_gather(query.index_select(0, rows).contiguous(), dim=1)
            b.q[:n].copy_(q)
        else:
            torch.index_select(query, 0, rows, out=b.q[:n])
        if self.use_copy:
            self._copy_keys(key, slot_mapping)
            keys = b.key_paged
        else:
            keys = kv_cache.transpose(1, 2).split(d, dim=-1)[0]
        paged_attention_stats(b.q[:n], keys, block_table[:n], seq_lens[:n], scale,
                              backend=self.ops_backend, out=b.stats, workspace=b.workspace)

    def _copy_keys(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The step's new keys into the plugin's copy, at vLLM's slot mapping
        (padding slots, ``slot < 0``, go to the trash row)."""
        b = self.buf
        m = min(int(slot_mapping.shape[0]), int(key.shape[0]))
        k = key[:m]
        if self.tp_size > 1:
            k = vllm_api.tp_all_gather(k.contiguous(), dim=1)
        if m <= b.slots.shape[0]:
            s, neg = b.slots[:m], b.neg[:m]
            s.copy_(slot_mapping[:m])
            torch.lt(s, 0, out=neg)
            s.masked_fill_(neg, b.trash_slot)
        else:  # more tokens than max_num_batched_tokens (not seen in vLLM): a temporary
            s = slot_mapping[:m].long()
            s = s.masked_fill(s < 0, b.trash_slot)
        b.key_flat.index_copy_(0, s, k if k.dtype == b.key_flat.dtype else k.to(b.key_flat.dtype))

    def _slot_mapping(self, md) -> torch.Tensor:
        sm = getattr(vllm_api.forward_context(), "slot_mapping", None)
        if isinstance(sm, dict) and sm.get(self.layer_name) is not None:
            return sm[self.layer_name]
        return md.slot_mapping

    def for_sampler(self, num_rows: int, device) -> Optional[AttnStats]:
        if self.layer_name is None:
            self.resolve()  # raises now (start-up) for an unsupported setup
        if not self.here:  # pipeline parallelism: received from the chosen layer's stage
            stats, n = self.carried, self.carried_rows
        else:
            b = self.buf
            if b is None:
                return None
            stats, n = b.stats, (b.cap if self.graphs else self.num_rows)
        if n is None or stats is None:
            return None
        if num_rows > n:
            _warn_once(f"Entropix: the sampler has {num_rows} logits rows but the last forward "
                       f"pass left attention figures for {n} requests; attention figures are "
                       "zeros for this step (speculative decoding is not supported)")
            return None
        out = stats[:, :num_rows]
        if device is not None and out.device != torch.device(device):
            out = out.to(device, non_blocking=True)
        return AttnStats(out[0], out[1], out[2], out[3])


    # -- pipeline parallelism ----------------------------------------------------
    def figures_to_send(self, num_reqs: int) -> Optional[torch.Tensor]:
        """The chosen layer's stage: its step's figures ``[4, rows]`` (a copy),
        or None when its forward pass left none."""
        b = self.buf
        n = num_reqs if self.graphs else self.num_rows
        if b is None or n is None or n > b.cap:
            return None
        return b.stats[:, :n].clone()

    def receive(self, figures: Optional[torch.Tensor]) -> None:
        """The last stage: the figures that came with this step's intermediate
        tensors, into its own buffer (None: the step has none)."""
        self.carried_rows = None
        if figures is None:
            return
        n = int(figures.shape[1])
        if n > self.max_num_seqs:
            _warn_once(f"Entropix: {n} rows of attention figures received, more than "
                       f"max_num_seqs ({self.max_num_seqs}); no attention figures for them")
            return
        if self.carried is None or self.carried.device != figures.device:
            self.carried = torch.zeros(4, self.max_num_seqs, dtype=torch.float32,
                                       device=figures.device)
        self.carried[:, :n].copy_(figures)
        self.carried_rows = n


_STATE: Optional[_Capture] = None
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        logger.warning(msg)


def after_forward(impl, layer, query, key, kv_cache, attn_metadata) -> None:
    """After vLLM's attention of any layer (``patches.apply_attention_capture``
    wraps the backends' ``forward``): the capture, for the chosen layer."""
    st = _STATE
    if st is None:
        return
    name = st.layer_name
    if name is None:
        name = st.resolve(_forward_layers())
    if getattr(layer, "layer_name", None) == name:
        st.on_forward(impl, layer, query, key, kv_cache, attn_metadata)


#: The name of the attention figures ``[4, num_reqs]`` (float32) in the
#: intermediate tensors a pipeline stage sends the next one.
PP_KEY = "entropix_attn_stats"


def pipeline_step(runner, run, scheduler_output, intermediate_tensors):
    """Around a runner's ``execute_model`` (``patches.apply_runner``):
    ``run(intermediate_tensors)`` is vLLM's. With pipeline parallelism the
    figures are taken out of what this stage received (vLLM's runner copies
    every received tensor into its own buffers by name), kept by the last
    stage for its sampler, and put into what this stage sends: the chosen
    layer's stage puts its own, a middle stage passes on what it received."""
    st = _STATE
    if st is None or st.pp_size == 1:
        return run(intermediate_tensors)
    if st.layer_name is None:
        st.resolve()
    carried = None
    if intermediate_tensors is not None:
        carried = intermediate_tensors.tensors.pop(PP_KEY, None)
    if st.pp_last and not st.here:
        st.receive(carried)
    out = run(intermediate_tensors)
    it_cls = vllm_api.intermediate_tensors_cls()
    if isinstance(out, it_cls):
        figures = (st.figures_to_send(len(scheduler_output.num_scheduled_tokens))
                   if st.here else carried)
        if figures is not None:
            out = it_cls({**out.tensors, PP_KEY: figures})
    return out


def _forward_layers():
    return getattr(vllm_api.forward_context(), "no_compile_layers", None)


# ----------------------------------------------------------------------------
# Public interface
# ----------------------------------------------------------------------------
def install(vllm_config, attn_layer: int = -1) -> None:
    """Install the capture in this (worker) process.

    Called once per worker process before the model runner is built (by
    ``engine.start_worker``, only when Entropix is enabled, after the engine
    checks and adjustments), with ``patches.apply_attention_capture`` (the
    backends' ``forward`` wrappers, which call :func:`after_forward`). The
    chosen layer and its backend are resolved at the first forward pass (or
    at :func:`prepare`); an unsupported backend raises
    :class:`AttentionCaptureError` then (start-up profiling run) or at the
    first :func:`attention_stats_for_sampler` call, whichever comes first.
    Calling it again replaces the chosen layer and drops the buffers, the CPU
    key copy included: keys of blocks computed before (prefix-cache hits
    later) would be missing, so install once, before the first request.
    """
    global _STATE
    _STATE = _Capture(vllm_config, attn_layer)


def attention_stats_for_sampler(num_rows: int, device) -> Optional[AttnStats]:
    """Figures for the rows of the logits the sampler is about to process.

    Same order as the logits rows: the requests of the last forward pass, one
    row per request (``query_start_loc`` order). Float32 ``[num_rows]`` views
    of a persistent buffer, valid until the next forward pass. ``None`` when no
    forward pass left figures (e.g. the profiling dummy run), when the capture
    is not installed, or (with a warning) when the row counts disagree: the
    sampler then uses zeros.
    """
    if _STATE is None:
        return None
    return _STATE.for_sampler(num_rows, device)


def prepare() -> bool:
    """Allocate the capture's buffers now (the runner hook calls it once the KV
    cache is bound, before vLLM captures CUDA graphs), so that no buffer is
    first allocated inside a graph capture. False when not installed or when
    the chosen layer has no KV cache yet."""
    if _STATE is None:
        return False
    return _STATE.prepare()


def chosen_layer_name() -> Optional[str]:
    """The resolved layer name (None before the first forward pass)."""
    return None if _STATE is None else _STATE.layer_name


def uninstall() -> None:
    """Drop the capture state (the class wrappers stay and do nothing)."""
    global _STATE
    _STATE = None
