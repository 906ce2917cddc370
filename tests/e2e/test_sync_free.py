"""No host sync on the per-step Entropix path (issue 19), counted on CPU.

A real vLLM engine (bundled model, in-process engine core) serves a mixed
batch: Entropix rows (seeded and not, with logprobs, one with its own CoT
token), stock rows (seeded and not), a greedy row, long prompts prefilled in
chunks (discarded samples), with the trace on. Every call of the attention
capture (``attention._Capture.on_forward``) and of the MRV1 sampler's
``sample`` runs under :class:`sync_audit.SyncAudit`, which counts the calls
that would synchronise the host with a GPU or copy from pageable memory:
``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool/int/float(t)``,
``aten::_local_scalar_dense``, value-dependent shapes (``nonzero``, boolean
masks, ...), device copies outside ``entropix_vllm.device.to_device``.
The plugin's own count must be zero; vLLM's own sampler (stock rows) is
reported, not judged. The audit itself is checked to catch a planted sync.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from entropix_vllm import bundled  # noqa: E402

from sync_audit import SyncAudit, audit_calls, host_tensors_of  # noqa: E402

LONG = " ".join(f"Line {i}: the {['red', 'green', 'blue'][i % 3]} jar holds {i * 5 % 11} beads."
                for i in range(60))


def test_audit_catches_a_planted_sync():
    """The attribution: a ``.item()`` in code whose file is under entropix_vllm
    is ours; the same call from this test file is not; a pageable copy is a copy."""
    code = compile("def f(t):\n    return t.sum().item()\n",
                   os.path.join(os.path.dirname(bundled.__file__), "planted.py"), "exec")
    ns: dict = {}
    exec(code, ns)
    t = torch.arange(4.0)
    with SyncAudit() as a:
        ns["f"](t)
        t.sum().item()
        t.nonzero()
    ours = a.ours()
    assert [e.what for e in ours] == ["item", "aten::_local_scalar_dense"], a.events
    assert {e.what for e in a.theirs()} >= {"item", "aten::nonzero"}
    host = torch.zeros(3)
    dev = torch.ones(3)
    with SyncAudit(host_tensors=[host]) as b:
        host[:2].tolist()                   # a host buffer: not a sync
        host.to("cpu")                      # host data to a device: a copy
        dev.to("cpu")                       # a device tensor to its device: nothing
        made = torch.from_numpy(host.numpy().copy())
        made.to(dev.device)                 # host data (from numpy) to a device: a copy
        dev.tolist()                        # a device tensor read on the host: a sync
    assert [e.what for e in b.events] == ["to(device)", "to(device)", "tolist"], b.events


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine core (and runner) here
    from vllm import LLM, SamplingParams

    from entropix_vllm.integration import attention, mrv1

    trace = str(tmp_path_factory.mktemp("sync") / "trace.jsonl")
    llm = LLM(bundled.bundled_model_path(), dtype="float32", max_model_len=2048,
              max_num_batched_tokens=256, max_num_seqs=16, enable_prefix_caching=False,
              additional_config={"sampler": "entropix", "entropix": {"trace_path": trace}})
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    # start-up's profiling run ran the Entropix step once (memory profile, compiles)
    assert runner.sampler.runtime.warmed_rows == [16, 1]
    audit = SyncAudit(host_tensors=host_tensors_of(runner, runner.input_batch))
    calls: list = []
    restore = [(attention._Capture, "on_forward",
                audit_calls(attention._Capture, "on_forward", audit, calls)),
               (type(runner.sampler), "sample",
                audit_calls(type(runner.sampler), "sample", audit, calls))]
    assert isinstance(runner.sampler, mrv1.EntropixSamplerV1)
    prompts = ["Name three colours.", "What is 12 + 30?", LONG + " How many lines?",
               "Write a haiku about rain.", "Capital of Italy?", LONG + " Which jar is red?",
               "Say hello.", "Count to four."]
    params = [SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3),                         # Entropix
              SamplingParams(max_tokens=12, ignore_eos=True, seed=7),                             # seeded
              SamplingParams(max_tokens=12, ignore_eos=True, seed=11, logprobs=2),                # chunked
              SamplingParams(max_tokens=12, ignore_eos=True, extra_args={"entropix": False}),     # stock
              SamplingParams(max_tokens=12, ignore_eos=True, seed=5, extra_args={"entropix": False}),
              SamplingParams(max_tokens=12, ignore_eos=True),                                     # chunked
              SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0),                    # greedy
              SamplingParams(max_tokens=12, ignore_eos=True, extra_args={"entropix_cot_token": 30})]
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        for owner, name, orig in restore:
            setattr(owner, name, orig)
    yield audit, calls, outs
    del llm


def test_no_host_sync_in_the_entropix_path(audited_run):
    audit, calls, outs = audited_run
    # The run covered what it claims: every request finished, both hooks ran
    # many times, the audit saw aten ops inside them.
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert calls.count("on_forward") >= 12 and calls.count("sample") >= 12
    assert audit.ops > 100 and audit.regions == len(calls)
    ours = audit.ours()
    assert ours == [], "host syncs / blocking copies in entropix_vllm:\n" + \
        "\n".join(map(str, ours))
    # Host-to-device copies go through the one door (pinned, non-blocking on CUDA).
    assert audit.door_copies >= 1
    print(f"\n{len(calls)} audited calls, {audit.ops} aten ops; plugin syncs: 0; "
          f"vLLM's own (stock rows): {len(audit.theirs())}; to_device copies: "
          f"{audit.door_copies}")


@pytest.mark.skipif(not __import__("entropix_vllm.ops", fromlist=["x"]).triton_available(),
                    reason="needs Triton (the interpreter on CPU)")
def test_no_host_sync_in_the_triton_step():
    """The GPU path's launchers (logit statistics + candidates, the fused
    decision) called through the step: no sync from the project's Python (the
    interpreter's own work to run a kernel on CPU is not counted)."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set")
    from entropix_vllm import step
    from entropix_vllm.config import EntropixConfig
    from entropix_vllm.contract import K_MAX, AttnStats

    g = torch.Generator().manual_seed(0)
    B, V = 5, 3000
    logits = torch.randn(B, V, generator=g) * 3
    table = step.coefficient_table([EntropixConfig(), EntropixConfig(top_k=9)] * 2
                                   + [EntropixConfig()])
    attn = AttnStats(*(torch.rand(B, generator=g) for _ in range(4)))
    cot, prev = torch.full((B,), 11), torch.zeros(B, dtype=torch.bool)
    noise = torch.empty(B, 3, K_MAX).exponential_(generator=g)
    step.entropix_step(logits, attn, table, cot, prev, noise, backend="triton")  # warm (plans)
    with SyncAudit() as audit:
        got = step.entropix_step(logits, attn, table, cot, prev, noise, backend="triton")
    assert audit.ours() == [], [str(e) for e in audit.ours()]
    want = step.entropix_step(logits, attn, table, cot, prev, noise, backend="torch")
    assert torch.equal(got.tokens, want.tokens)
