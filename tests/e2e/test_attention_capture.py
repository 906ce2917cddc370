"""End to end: attention figures captured from vLLM (CPU backend, paged KV
cache, default compilation) against HF transformers eager attention.

One engine (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0), float32, chunked
prefill with max_num_batched_tokens=64; four prompts of different lengths
(one of 150 tokens, prefilled in chunks) batched together, 8 greedy tokens
each. The capture is installed in the worker before its model runner is built
(as the plugin does), under vLLM's CPU compilation mode (DYNAMO_TRACE_ONCE;
dynamo's eager backend unless ENTROPIX_TEST_INDUCTOR=1 asks for inductor); every
forward pass's figures are recorded per row with the requests of the rows, and
each row is compared with HF eager attention at the same position: the last
position of a prefill chunk (partial chunks included), the prompt's last
position, and every decode step.

Uses the bundled model when ``entropix_vllm.bundled`` provides it, else the
tiny random Llama of tests/tiny_model.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the shared helpers
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from entropix_vllm.integration import attention as A  # noqa: E402
from entropix_vllm.integration import engine as entropix_engine  # noqa: E402
import attention_rpc as R  # noqa: E402
from hf_attention import figures_at, load_hf  # noqa: E402
from tiny_model import make_tiny_llama, tiny_prompt  # noqa: E402

PROMPT_LENS = (7, 31, 150, 19)
MAX_TOKENS = 8
MAX_BATCHED = 64
RTOL, ATOL = 1e-3, 1e-6
NAMES = ("attn_entropy", "attn_varentropy", "agreement", "interaction_strength")


def _model_path(tmp_path_factory):
    try:
        from entropix_vllm.bundled import bundled_model_path
        path = bundled_model_path()
        if path and os.path.exists(os.path.join(str(path), "config.json")):
            return str(path), "bundled"
    except Exception:
        pass
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama"))), "tiny"


def _prompts(path, kind):
    if kind == "tiny":
        return [tiny_prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    text = ("The history of the printing press begins in the fifteenth century, when movable "
            "type changed how books were made, sold and read across Europe. ") * 20
    ids = tok(text, add_special_tokens=False).input_ids
    # Different starting points so that the prompts differ (and are distinct).
    return [ids[3 * i: 3 * i + n] for i, n in enumerate(PROMPT_LENS)]


def _compilation():
    """vLLM's CPU default is DYNAMO_TRACE_ONCE with the inductor backend; the
    same mode with dynamo's eager backend traces the same graph (the attention
    op stays an opaque custom op, run eagerly) and starts ~80 s faster here.
    ENTROPIX_TEST_INDUCTOR=1 runs the exact default."""
    if os.environ.get("ENTROPIX_TEST_INDUCTOR", "0") not in ("", "0"):
        return {}
    return {"compilation_config": {"mode": 2, "backend": "eager"}}  # 2 = DYNAMO_TRACE_ONCE


def _startup_state(worker):
    return A.chosen_layer_name(), A.attention_stats_for_sampler(1, "cpu")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    path, kind = _model_path(tmp_path_factory)
    from vllm import LLM
    from vllm.v1.worker.cpu_worker import CPUWorker

    # Install the capture the way the plugin does: in the worker, before the
    # model runner is built (the engine is in-process, so a class-level hook
    # of this process reaches the worker), so that start-up runs go through it.
    orig_init_device = CPUWorker.init_device

    def init_device(self, *args, **kwargs):
        R.install(self.vllm_config, -1)
        return orig_init_device(self, *args, **kwargs)

    CPUWorker.init_device = init_device
    try:
        llm = LLM(model=path, dtype="float32", max_model_len=512, max_num_seqs=8,
                  max_num_batched_tokens=MAX_BATCHED, enable_chunked_prefill=True, seed=0,
                  **_compilation())
    finally:
        CPUWorker.init_device = orig_init_device
    # Start-up (profiling / warm-up) went through the wrapper, resolved the
    # layer and left no figures behind.
    assert llm.collective_rpc(_startup_state)[0] == (
        f"model.layers.{llm.llm_engine.model_config.hf_config.num_hidden_layers - 1}.self_attn.attn",
        None)
    R.record()
    llm.collective_rpc(R.rpc_track_requests)
    yield llm, path, kind
    del llm
    A.uninstall()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def hf_model(engine):
    return load_hf(engine[1])


def _generate(llm, prompts, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm.collective_rpc(R.rpc_records, args=(True,))  # drop older records
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    records = llm.collective_rpc(R.rpc_records, args=(True,))[0]
    return [list(o.outputs[0].token_ids) for o in outs], records


def _rows(prompts, outputs, records):
    """(request index, L, figures, query_len) for every recorded row."""
    index = {tuple(p): i for i, p in enumerate(prompts)}
    assert len(index) == len(prompts)
    rows = []
    for rec in records:
        assert len(rec["prompt_token_ids"]) == len(rec["seq_lens"]) == len(rec["stats"])
        for ptoks, L, fig, ql in zip(rec["prompt_token_ids"], rec["seq_lens"], rec["stats"],
                                     rec["query_lens"]):
            rows.append((index[tuple(ptoks)], L, fig, ql))
    return rows


def _compare(hf, prompts, outputs, rows, layer):
    by_req = {}
    for r, L, fig, _ in rows:
        by_req.setdefault(r, []).append((L, fig))
    for r, items in by_req.items():
        tokens = prompts[r] + outputs[r]
        want = figures_at(hf, tokens, layer, [L for L, _ in items])
        got = torch.tensor([fig for _, fig in items], dtype=torch.float64)
        want = torch.tensor(want, dtype=torch.float64)
        for j, name in enumerate(NAMES):
            torch.testing.assert_close(got[:, j], want[:, j], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"request {r} {name}: {m}")


@pytest.fixture(scope="module")
def batch_run(engine):
    llm, path, kind = engine
    prompts = _prompts(path, kind)
    outputs, records = _generate(llm, prompts)
    return prompts, outputs, records


def test_figures_match_hf_eager_every_step(batch_run, hf_model):
    prompts, outputs, records = batch_run
    rows = _rows(prompts, outputs, records)
    P = [len(p) for p in prompts]
    # Every (request, step) is there once: prefill chunks + one row per decode step.
    for i in range(len(prompts)):
        Ls = [L for r, L, _, _ in rows if r == i]
        assert Ls == sorted(set(Ls)), f"request {i}: rows {Ls}"
        assert Ls[-1] == P[i] + MAX_TOKENS - 1
        assert [L for L in Ls if L >= P[i]] == list(range(P[i], P[i] + MAX_TOKENS))
    # The run covers what it claims to cover.
    assert any(len(rec["seq_lens"]) >= 3 for rec in records), "no step with several requests"
    assert any(L < P[r] for r, L, _, _ in rows), "no partial prefill chunk"
    assert any(L == P[r] and ql > 1 for r, L, _, ql in rows), "no prefill ending a prompt"
    assert any(L > P[r] and ql == 1 for r, L, _, ql in rows), "no decode step"
    assert any(len(rec["seq_lens"]) >= 2 and 1 in rec["query_lens"]
               and max(rec["query_lens"]) > 1 for rec in records), "no mixed prefill/decode step"
    _compare(hf_model, prompts, outputs, rows, layer=-1)


def test_figures_are_not_degenerate(batch_run):
    # Guard against a test that cannot fail: the figures vary across rows and
    # are far from zero (uniform or empty attention would give other values).
    _, _, records = batch_run
    figs = torch.tensor([f for rec in records for f in rec["stats"]])
    assert (figs[:, 0] > 0.1).all() and (figs[:, 3] > 0).all()
    assert (figs.std(0) > 1e-3).all()


def _sampler_view(worker, num_rows):
    st = A.attention_stats_for_sampler(num_rows, "cpu")
    if st is None:
        return None
    return [getattr(st, n).tolist() for n in NAMES]


def test_sampler_view_is_the_last_forward_pass(engine):
    llm, path, kind = engine
    prompts = _prompts(path, kind)[:2]
    _, records = _generate(llm, prompts, max_tokens=2)
    last = torch.tensor(records[-1]["stats"])  # [rows, 4]
    n = last.shape[0]
    got = llm.collective_rpc(_sampler_view, args=(n,))[0]
    assert got is not None
    torch.testing.assert_close(torch.tensor(got).t(), last, rtol=0, atol=0)
    # Fewer rows: the first ones; more rows than requests: no figures (zeros).
    got1 = llm.collective_rpc(_sampler_view, args=(1,))[0]
    torch.testing.assert_close(torch.tensor(got1).t(), last[:1], rtol=0, atol=0)
    assert llm.collective_rpc(_sampler_view, args=(n + 1,))[0] is None


def _try_resolve(worker, attn_layer):
    cap = A._Capture(worker.vllm_config, attn_layer)
    try:
        return cap.resolve()
    except A.AttentionCaptureError as e:
        return "error: " + str(e)


def test_layer_choice_and_range(engine):
    llm = engine[0]
    n = getattr(llm.llm_engine.model_config.hf_config, "num_hidden_layers")
    assert llm.collective_rpc(_try_resolve, args=(-1,))[0] == f"model.layers.{n - 1}.self_attn.attn"
    assert llm.collective_rpc(_try_resolve, args=(0,))[0] == "model.layers.0.self_attn.attn"
    msg = llm.collective_rpc(_try_resolve, args=(n,))[0]
    assert msg.startswith("error:") and f"-{n}..{n - 1}" in msg


def test_first_layer_matches_hf(engine, hf_model):
    llm, path, kind = engine
    prompts = _prompts(path, kind)[1:2]
    try:
        llm.collective_rpc(R.rpc_install, args=(0, True))
        outputs, records = _generate(llm, prompts, max_tokens=3)
        assert {rec["layer"] for rec in records} == {"model.layers.0.self_attn.attn"}
        _compare(hf_model, prompts, outputs, _rows(prompts, outputs, records), layer=0)
    finally:
        llm.collective_rpc(R.rpc_install, args=(-1, True))


# ----------------------------------------------------------------------------
# Start-up checks on real vLLM layers and configs (no engine).
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_layer_config(tmp_path_factory):
    """A VllmConfig holding two real Attention layers: layer 0 on CPU_ATTN (this
    platform's backend), layer 1 built with the FLEX_ATTENTION backend."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend

    path = make_tiny_llama(str(tmp_path_factory.mktemp("tiny_cfg")))
    cfg = VllmConfig(model_config=ModelConfig(model=path, dtype="float32"))
    with set_current_vllm_config(cfg):
        Attention(4, 32, 32 ** -0.5, 2, prefix="model.layers.0.self_attn.attn")
        Attention(4, 32, 32 ** -0.5, 2, prefix="model.layers.1.self_attn.attn",
                  attn_backend=FlexAttentionBackend)
    return cfg


def test_unsupported_backend_is_a_clear_error(two_layer_config):
    with pytest.raises(A.AttentionCaptureError) as e:
        A._Capture(two_layer_config, -1).resolve()
    msg = str(e.value)
    assert "FLEX_ATTENTION" in msg and "model.layers.1.self_attn.attn" in msg
    assert all(b in msg for b in A.supported_backends())
    # The supported layer resolves; an out-of-range index names the range.
    cap = A._Capture(two_layer_config, 0)
    assert cap.resolve() == "model.layers.0.self_attn.attn"
    assert cap.backend == "CPU_ATTN" and cap.use_copy
    with pytest.raises(A.AttentionCaptureError, match=r"-2\.\.1"):
        A._Capture(two_layer_config, 2).resolve()


def test_sampler_call_raises_for_unsupported_backend(two_layer_config):
    # No forward pass ran: the first sampler call (start-up dummy sampler run)
    # resolves the layer and raises, instead of handing out zeros silently.
    saved = A._STATE
    try:
        A._STATE = A._Capture(two_layer_config, -1)
        with pytest.raises(A.AttentionCaptureError, match="FLEX_ATTENTION"):
            A.attention_stats_for_sampler(4, "cpu")
    finally:
        A._STATE = saved


def test_engine_adjustments_keep_cudagraphs_and_stop_row_reordering():
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode, ParallelConfig

    class Holder:  # the two parts of a VllmConfig that the adjustments read
        def __init__(self, cc, pc):
            self.compilation_config, self.parallel_config = cc, pc

    for mode, graphs in ((CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL_AND_PIECEWISE),
                         (CompilationMode.NONE, CUDAGraphMode.FULL_DECODE_ONLY)):
        cc = CompilationConfig(mode=mode, cudagraph_mode=graphs)
        pc = ParallelConfig()
        pc.enable_batch_sharded_sampling = True
        pc.enable_dbo = True
        h = Holder(cc, pc)
        changes = entropix_engine.adjust_before_vllm(h)
        # The graph mode is the engine's: the capture is recorded into full graphs.
        assert cc.cudagraph_mode == graphs and len(changes) == 2
        assert pc.enable_batch_sharded_sampling is False and pc.enable_dbo is False
        assert entropix_engine.adjust_before_vllm(h) == []


def test_engine_check_refuses_context_parallelism_and_pp_under_external_launcher(
        two_layer_config):
    import copy

    def with_parallel(**values):
        cfg = copy.copy(two_layer_config)
        cfg.parallel_config = copy.copy(two_layer_config.parallel_config)
        for attr, value in values.items():
            setattr(cfg.parallel_config, attr, value)
        return cfg

    for attr, what in (("decode_context_parallel_size", "context parallel"),
                       ("ubatch_size", "micro-batching")):
        with pytest.raises(entropix_engine.EntropixEngineError, match=what):
            entropix_engine.check(with_parallel(**{attr: 2}))
    # Pipeline parallelism runs (the figures travel between stages: attention.py),
    # except under torchrun's external_launcher, where every stage samples.
    entropix_engine.check(with_parallel(pipeline_parallel_size=2))
    with pytest.raises(entropix_engine.EntropixEngineError,
                       match="pipeline_parallel_size=2.*external_launcher"):
        entropix_engine.check(with_parallel(pipeline_parallel_size=2,
                                            distributed_executor_backend="external_launcher"))
    entropix_engine.check(two_layer_config)


def test_prefix_cache_hit_matches_hf(engine, hf_model):
    # A second request sharing the first 128-token block (vLLM's CPU block
    # size) with an earlier one: its keys for that block are not recomputed,
    # they come from the cached block (and the plugin's copy of it).
    llm, path, kind = engine
    # 150 tokens no earlier request started with (install() may have been
    # called again by an earlier test: the plugin's key copy starts empty then).
    base = list(reversed(_prompts(path, kind)[2]))
    first = base[:140]
    _generate(llm, [first], max_tokens=1)
    second = base[:130] + list(reversed(base[130:150]))
    assert second != base[:150]
    outputs, records = _generate(llm, [second], max_tokens=3)
    rows = _rows([second], outputs, records)
    first_row = rows[0]
    assert first_row[1] == len(second) and first_row[3] < len(second) - 100, \
        f"no prefix cache hit (L={first_row[1]}, query_len={first_row[3]})"
    _compare(hf_model, [second], outputs, rows, layer=-1)
