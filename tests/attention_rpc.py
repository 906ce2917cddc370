"""Test-only hooks into the attention capture (``entropix_vllm/integration/attention.py``).

``record()`` makes the installed capture append, for every forward pass of the
chosen layer, the rows' seq lens, query lens and figures to :data:`RECORDS`
(host copies: it synchronises). The ``rpc_*`` functions take the worker, for
``LLM.collective_rpc`` (in-process engines, or worker processes that import
this module by name from the test's ``sys.path``).
"""

from __future__ import annotations

import functools
from typing import List

from entropix_vllm.integration import attention as A

RECORDS: List[dict] = []


def record(state=None) -> None:
    """Record every forward pass of ``state`` (default: the installed capture)."""
    st = state if state is not None else A._STATE
    if st is None:
        raise RuntimeError("install the capture first")
    if getattr(st, "_test_recording", False):
        return
    orig = st.on_forward

    def on_forward(impl, layer, query, key, kv_cache, md):
        orig(impl, layer, query, key, kv_cache, md)
        n = st.num_rows
        if n is None:
            return
        qsl = md.query_start_loc
        RECORDS.append({
            "layer": st.layer_name,
            "seq_lens": md.seq_lens[:n].tolist(),
            "query_lens": (qsl[1:] - qsl[:-1]).tolist(),
            "stats": st.buf.stats[:, :n].t().tolist(),
        })

    st.on_forward = on_forward
    st._test_recording = True


def install(vllm_config, attn_layer: int = -1) -> None:
    """The capture as ``engine.start_worker`` installs it: the backends'
    ``forward`` wrappers (``patches.apply_attention_capture``) and the state."""
    from entropix_vllm.integration import patches

    patches.apply_attention_capture(A.after_forward)
    A.install(vllm_config, attn_layer)


def rpc_install(worker, attn_layer: int = -1, rec: bool = True) -> str:
    """Install the capture inside a running worker, recording."""
    install(worker.vllm_config, attn_layer)
    if rec:
        record()
    return "ok"


def rpc_records(worker, clear: bool = True) -> List[dict]:
    out = list(RECORDS)
    if clear:
        RECORDS.clear()
    return out


def rpc_track_requests(worker) -> str:
    """Annotate each record with the requests of its rows (MRV1 runner):
    ``req_ids`` and ``prompt_token_ids`` in row order."""
    runner = worker.model_runner
    if getattr(runner, "_entropix_tracked", False):
        return "ok"
    orig = runner.execute_model

    @functools.wraps(orig)
    def execute_model(*args, **kwargs):
        before = len(RECORDS)
        out = orig(*args, **kwargs)
        if len(RECORDS) > before:
            ids = list(runner.input_batch.req_ids)
            rec = RECORDS[-1]
            rec["req_ids"] = ids
            rec["prompt_token_ids"] = [list(runner.requests[r].prompt_token_ids) for r in ids]
        return out

    runner.execute_model = execute_model
    runner._entropix_tracked = True
    return "ok"
