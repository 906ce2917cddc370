"""The attention capture under full CUDA graphs, shown on CPU with the Triton
kernels in the interpreter (issue 19, item 4).

A CUDA graph records the tensor work of one forward pass of a padded batch
size and replays it with new contents of the same tensors; none of the
capture's Python runs on a replay. So:

* the tensor work (``_Capture.compute``) must read only the step's tensors
  and write only persistent buffers, and change no Python state the sampler
  relies on: a "replay" here calls ``compute`` alone, after the contents of
  vLLM's persistent metadata buffers (query start locations, sequence
  lengths, block table, queries, KV cache) changed in place, and the sampler
  must then read the new batch's figures (float64 reference), with the capture's
  attributes untouched;
* it allocates nothing and never reads a device value on the host
  (:class:`sync_audit.SyncAudit` with allocations counted; the interpreter's own
  work to run a kernel is not counted: on a GPU a launch runs no torch op);
* a padded batch (graph size 8, 5 requests, pad rows with ``seq_len`` 0) gives
  the 5 requests' figures to a sampler reading 5 rows;
* with full graphs the sampler does not depend on the row count the Python
  side last saw (it is stale after a replay).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("vllm")
from entropix_vllm import ops, reference  # noqa: E402
from entropix_vllm.integration import attention as A  # noqa: E402

from sync_audit import SyncAudit  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="needs Triton (interpreter)")

DEV = torch.device("cuda" if CUDA else "cpu")
H, HKV, D, BS, NB, WIDTH, CAP = 4, 2, 32, 16, 32, 4, 8
SCALE = D ** -0.5
FIELDS = ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")


def _config(graph_mode):
    from vllm.config import CUDAGraphMode

    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=CAP, max_num_batched_tokens=64),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        compilation_config=SimpleNamespace(cudagraph_mode=getattr(CUDAGraphMode, graph_mode)),
        model_config=SimpleNamespace(dtype=torch.float32))


class Step:
    """vLLM's persistent per-step tensors for a decode batch of ``n`` padded rows
    (views of capacity-sized buffers, as the runner hands them to a graph)."""

    def __init__(self, n: int):
        self.n = n
        self.kv = torch.zeros(NB, HKV, BS, 2 * D, device=DEV)
        self.qsl = torch.zeros(CAP + 1, dtype=torch.int32, device=DEV)
        self.seq = torch.zeros(CAP, dtype=torch.int32, device=DEV)
        self.bt = torch.zeros(CAP, WIDTH, dtype=torch.int32, device=DEV)
        self.query = torch.zeros(CAP, H * D, device=DEV)
        self.md = SimpleNamespace(query_start_loc=self.qsl[:n + 1], seq_lens=self.seq[:n],
                                  block_table=self.bt[:n], slot_mapping=None)

    def fill(self, lens, seed: int) -> None:
        """New contents in place (a real request per length; the rest pad rows)."""
        g = torch.Generator().manual_seed(seed)
        self.kv.copy_(torch.randn(self.kv.shape, generator=g))
        self.query.copy_(torch.randn(self.query.shape, generator=g))
        self.qsl.copy_(torch.arange(CAP + 1, dtype=torch.int32).clamp(max=len(lens)))
        self.seq.zero_()
        self.seq[:len(lens)] = torch.tensor(lens, dtype=torch.int32)
        self.bt.copy_(torch.randperm(NB, generator=g)[:CAP * WIDTH].view(CAP, WIDTH))

    def reference(self, rows: int):
        keys_view = self.kv.cpu().transpose(1, 2).split(D, -1)[0]
        q = self.query.cpu().view(CAP, H, D)[:rows]
        keys = [reference.gather_paged(keys_view, self.bt.cpu()[b], int(self.seq[b]))
                for b in range(rows)]
        return reference.attention_stats(q, keys, SCALE, dtype=torch.float64)


def _capture(graph_mode="FULL_DECODE_ONLY"):
    cap = A._Capture(_config(graph_mode), -1)
    cap.layer_name, cap.backend, cap.use_copy = "model.layers.0.self_attn.attn", "TRITON_ATTN", False
    cap.ops_backend = "triton"
    return cap


IMPL = SimpleNamespace(num_heads=H, head_size=D, scale=SCALE)


def _assert_figures(got, want, rows):
    assert got is not None
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f).cpu().double(), getattr(want, f)[:rows],
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{f}: {m}")


def _state(cap):
    return {k: v for k, v in vars(cap).items()}, {k: v for k, v in vars(cap.buf).items()}


def test_replay_recomputes_the_figures_without_python():
    cap = _capture()
    step = Step(CAP)
    step.fill([40, 9, 64, 1, 17], seed=1)
    cap.on_forward(IMPL, None, step.query, None, step.kv, step.md)      # the capture
    _assert_figures(A._Capture.for_sampler(cap, 5, DEV), step.reference(5), 5)
    cap.num_rows = None                                  # whatever Python last saw
    before = _state(cap)
    stats_ptr = cap.buf.stats.data_ptr()

    for seed, lens in ((2, [3, 64, 33, 2, 50]), (3, [64, 1, 1, 1, 1, 8, 20, 7])):
        step.fill(lens, seed=seed)                       # new batch, same tensors
        with SyncAudit(allocations=True) as audit:
            cap.compute(CAP, step.query.view(CAP, H, D), None, step.kv, step.md.query_start_loc,
                        step.md.block_table, step.md.seq_lens, None, SCALE)   # the replay
        assert audit.ours() == [], [str(e) for e in audit.ours()]
        assert _state(cap) == before and cap.buf.stats.data_ptr() == stats_ptr
        rows = len(lens)
        _assert_figures(cap.for_sampler(rows, DEV), step.reference(rows), rows)
        # pad rows (seq_len 0) hold zeros
        assert torch.equal(cap.buf.stats[:, rows:CAP].cpu(), torch.zeros(4, CAP - rows))


def test_the_audit_would_see_an_allocating_capture():
    # The check can fail: the same work without the workspace allocates.
    cap = _capture()
    step = Step(CAP)
    step.fill([5, 6, 7], seed=4)
    cap.on_forward(IMPL, None, step.query, None, step.kv, step.md)
    cap.buf.workspace = None
    with SyncAudit(allocations=True) as audit:
        ops.paged_attention_stats(cap.buf.q[:3], step.kv.transpose(1, 2).split(D, -1)[0],
                                  step.bt[:3], step.seq[:3], SCALE, backend="triton")
    assert audit.ours_of("alloc"), audit.events


def test_eager_engines_keep_the_row_count_check():
    # Without full graphs every forward pass runs the Python side: a sampler
    # asking for more rows than the last forward pass had gets no figures.
    cap = _capture("NONE")
    step = Step(3)
    step.fill([5, 6, 7], seed=5)
    cap.on_forward(IMPL, None, step.query, None, step.kv, step.md)
    _assert_figures(cap.for_sampler(3, DEV), step.reference(3), 3)
    assert cap.for_sampler(4, DEV) is None
    # with full graphs the buffer is trusted (a replay leaves no row count)
    graphs = _capture()
    graphs.on_forward(IMPL, None, step.query, None, step.kv, step.md)
    graphs.num_rows = None
    _assert_figures(graphs.for_sampler(3, DEV), step.reference(3), 3)


def test_buffers_are_allocated_once_before_capture():
    """``prepare`` (the runner hook after the KV cache is bound) allocates every
    buffer; later forward passes of any batch size up to capacity reuse them."""
    cap = _capture()
    step = Step(CAP)
    layer = SimpleNamespace(kv_cache=step.kv, impl=SimpleNamespace(num_heads=H, head_size=D,
                                                                    num_kv_heads=HKV))
    cap.resolve = lambda layers=None: cap.layer_name
    cap._layers = lambda layers=None: {cap.layer_name: layer}
    assert cap.prepare()
    buf = cap.buf
    ptrs = {k: v.data_ptr() for k, v in vars(buf).items() if isinstance(v, torch.Tensor)}
    assert buf.workspace is not None and buf.stats.shape == (4, CAP)
    for n, lens in ((1, [9]), (CAP, [4] * CAP), (3, [1, 2, 3])):
        s = Step(n)
        s.kv = step.kv
        s.fill(lens, seed=n)
        cap.on_forward(IMPL, None, s.query, None, s.kv, s.md)
        assert cap.buf is buf
        assert {k: v.data_ptr() for k, v in vars(buf).items()
                if isinstance(v, torch.Tensor)} == ptrs
        _assert_figures(cap.for_sampler(len(lens), DEV), s.reference(len(lens)), len(lens))
