"""The Entropix sampler for vLLM's Model Runner V2 (``integration/mrv2.py``) and
its seeded noise (``ops.seeded_exponential_noise``: the Triton kernel of
``triton_kernels/seeded_noise.py`` and ``torch_ops.seeded_exponential_noise``).

Tested here (CPU-only machine, vLLM 0.32 CPU wheel):

* Seeded Exp(1) noise: the Triton kernel (Triton interpreter) against its
  torch fallback; the hash against a textbook murmur3_32 (itself checked on
  published test vectors); Exp(1) mean, variance, KS distance, small-value
  tail, neighbour correlations; each row a function of (seed, position)
  only (alone, permuted, prefix of a deeper/wider tensor); argument checks.
* ``mrv2.py`` alone: importing it imports no MRV2 module of vLLM; a vLLM
  ``Sampler`` whose ``sample`` lacks the arguments read here is refused,
  naming them.
* ``EntropixSamplerV2`` built from vLLM's real MRV2 classes (``Sampler``,
  ``SamplingStates``, ``RequestState``, ``InputBatch``, ``InputBuffers``,
  ``UvaBackedTensor`` tables) and driven through ``add_request`` /
  ``apply_staged_writes`` / ``sample`` / ``__call__`` on CPU tensors, with
  vLLM's own MRV2 Triton kernels (Gumbel sampling, temperature, min_p, logit
  bias / allowed tokens, penalties, staged writes, ``num_sampled``) running
  in the Triton interpreter:
  - Entropix rows equal ``entropix_step`` on the same logits and
    (seed, position) noise, on the all-Entropix fast path and in mixed
    batches; the request's own temperature/top_k/top_p/min_p do not leak in
    (vLLM's ``SamplingStates`` hold a temperature-1 copy, the processors the
    request's own params); per-request coefficient overrides apply;
  - stock rows (``entropix: false``) equal vLLM's stock ``Sampler`` for the
    same requests and seeds (tokens and processed logits); an all-stock
    batch is vLLM's sampling untouched;
  - allowed-token ids, logit bias and repetition penalties reach Entropix
    (argmax rows give the argmax of the masked/penalised logits);
  - the CoT token is suppressed only after a *generated* CoT token (position
    past the prompt); per-request CoT ids apply;
  - a seeded row's tokens do not depend on the rest of the batch;
  - logprobs (raw and processed modes) belong to the returned tokens;
  - attention figures left by the capture reach the step for the same rows;
  - runner patch (``plugin.patch_runner``, the same for MRV1 and MRV2):
    idempotent; this vLLM's ``load_model`` builds the sampler through the
    module-level ``Sampler`` name; the name is restored after the build
    (also on error); a runner whose sampler is not ours (watermarking,
    custom samplers) is refused.
  These run in a child process. vLLM's CPU wheel disables Triton, so the
  child points ``vllm.triton_utils`` at the real (interpreted) Triton before
  any MRV2 module is imported, uses vLLM's non-UVA buffers (UVA needs pinned
  CUDA memory) and vLLM's PyTorch top-k/top-p (its Triton top-k/top-p kernel
  fails in the interpreter). Doing that in the pytest process would change
  vLLM for the other test modules. With CUDA the child uses none of these
  stand-ins and runs the same checks on the GPU.

Awaiting a GPU build of vLLM (not exercised here):

* vLLM's MRV2 kernels compiled for CUDA, UVA (pinned, round-robin) tables,
  the Triton top-k/top-p kernel, FlashInfer / fused samplers for stock rows;
* the noise kernel compiled for CUDA (a few ulp from the interpreter and the
  torch fallback, not bitwise);
* ``GPUModelRunner.__init__`` / ``load_model`` running with the patch
  (``__init__`` needs ``torch.cuda.Stream``), i.e. an engine end to end on
  MRV2 (``VLLM_USE_V2_MODEL_RUNNER=1 vllm serve MODEL --sampler entropix``):
  async scheduling, piecewise CUDA graphs, chunked prefill, preemption,
  prompt logprobs, the attention capture's real figures and the trace
  through the real runner;
* tensor parallelism on MRV2 (the same tokens on every rank);
* vLLM 0.33 run (its source is checked against every internal used here by
  ``tests/integration/test_vllm_drift.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

CHILD_ENV = "ENTROPIX_MRV2_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON_RUNS = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


# ============================================================================
# mrv2.py without vLLM's MRV2 classes
# ============================================================================
def test_registering_imports_no_sampler_module():
    """The sampler modules are imported only when a runner of an Entropix
    engine builds one, not by ``register`` (which patches the runners)."""
    code = ("import sys\n"
            "from entropix_vllm.integration import plugin\n"
            "assert plugin.register()\n"
            "print(sorted(x for x in sys.modules if x.startswith("
            "'entropix_vllm.integration.mrv')))")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


# ============================================================================
# EntropixSamplerV2 on vLLM's MRV2 classes (child process)
# ============================================================================
def test_mrv2_sampler_on_vllm_classes_in_child_process():
    """Runs ``TestMRV2Sampler`` below in a fresh interpreter (see module docstring)."""
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "pytest", f"{os.path.abspath(__file__)}::TestMRV2Sampler",
           "-q", "-rs", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        pytest.fail(f"child pytest failed (rc={r.returncode}):\n{out[-12000:]}", pytrace=False)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    if " passed" not in tail:
        pytest.skip(f"child process ran no test: {out[-2000:]}")
    assert "failed" not in tail and "error" not in tail, tail


_SETUP_ERROR = None
if IN_CHILD:
    def _enable_vllm_mrv2_on_cpu() -> None:
        """CPU stand-ins for the GPU-only pieces of vLLM's MRV2 build (child only)."""
        if HAS_CUDA:
            return
        gpu_mods = [m for m in sys.modules if m.startswith("vllm.v1.worker.gpu")]
        if gpu_mods:
            raise RuntimeError(f"vLLM's MRV2 modules were imported before the interpreter "
                               f"switch: {gpu_mods[:3]}")
        import triton
        import triton.language as tl
        import triton.language.extra.libdevice as tldevice

        import vllm.triton_utils as tu
        tu.triton, tu.tl, tu.tldevice, tu.HAS_TRITON = triton, tl, tldevice, True
        import vllm.v1.worker.gpu.buffer_utils as bu
        bu.is_uva_available = lambda: False          # pinned UVA buffers need CUDA
        import vllm.v1.sample.ops.topk_topp_sampler as tks
        tks.HAS_TRITON = False                        # its Triton kernel fails interpreted
        import vllm.v1.worker.gpu.sample.gumbel as gumbel
        if not hasattr(gumbel._gumbel_sample_kernel, "run"):
            raise RuntimeError("vLLM's MRV2 Gumbel kernel is a placeholder, not a Triton kernel")

    try:
        _enable_vllm_mrv2_on_cpu()
        import dataclasses
        from types import SimpleNamespace

        from vllm.config import VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
        from vllm.v1.worker.gpu.sample.sampler import Sampler
        from vllm.v1.worker.gpu.states import RequestState

        from vllm.v1.sample.sampler import Sampler as SamplerV1
        from vllm.v1.utils import CpuGpuBuffer
        from vllm.v1.worker.gpu_input_batch import CachedRequestState
        from vllm.v1.worker.gpu_input_batch import InputBatch as InputBatchV1

        from entropix_vllm import step
        from entropix_vllm.contract import K_MAX
        from entropix_vllm.integration import attention, mrv1, mrv2, patches
        from entropix_vllm.integration.runtime import EntropixRuntime
        from entropix_vllm.reference import ARGMAX, INSERT_COT, AttnStats
    except Exception as e:  # named in the skip reason of every child test
        _SETUP_ERROR = f"{type(e).__name__}: {e}"

V = 300
MAX_REQS = 8
COT = 7


def _stub_vllm_config(entropix: dict):
    # What EntropixRuntime reads of a VllmConfig (the real one needs a model).
    return SimpleNamespace(additional_config={"sampler": "entropix", "entropix": entropix},
                           model_config=SimpleNamespace(get_vocab_size=lambda: V))


class NoiseReference:
    """The noise policy, stated independently of ``rows.py``: the default
    generator draws ``[B, N, K_MAX]`` for the step (N: the deepest Entropix row),
    then each seeded Entropix row whose sample produces a token overwrites its
    first ``n_draws`` draws from a generator seeded with its seed."""

    def __init__(self):
        self.gens = {}
        self.n_draws = {}
        self.state = None

    def add(self, rid, row, seed):
        if row.enabled:
            self.n_draws[rid] = max(1, row.n_draws)
            if seed is not None:
                self.gens[rid] = torch.Generator(device=DEV).manual_seed(seed)

    def before_step(self):
        self.state = (torch.cuda.get_rng_state() if HAS_CUDA else torch.get_rng_state())

    def noise(self, rids, produces=None):
        produces = produces if produces is not None else [True] * len(rids)
        N = max((self.n_draws[r] for r in rids if r in self.n_draws), default=1)
        if HAS_CUDA:
            torch.cuda.set_rng_state(self.state)
        else:
            torch.set_rng_state(self.state)
        out = torch.empty(len(rids), N, K_MAX, device=DEV).exponential_()
        for i, r in enumerate(rids):
            if r in self.gens and produces[i]:
                out[i, :self.n_draws[r]].exponential_(generator=self.gens[r])
        return out


class Harness:
    """A real MRV2 ``RequestState`` + sampler (ours or vLLM's) on ``DEV``."""

    def __init__(self, entropix: bool = True, logprobs_mode: str = "raw_logprobs",
                 engine: dict | None = None):
        self.rs = RequestState(max_num_reqs=MAX_REQS, max_model_len=64,
                               max_num_batched_tokens=64, num_speculative_steps=0,
                               vocab_size=V, device=DEV)
        cls = mrv2.EntropixSamplerV2 if entropix else Sampler
        self.sampler = cls(VllmConfig(), max_num_reqs=MAX_REQS, vocab_size=V, device=DEV,
                           req_states=self.rs, logprobs_mode=logprobs_mode)
        self.runtime = None
        if entropix:
            self.runtime = EntropixRuntime(_stub_vllm_config(engine or {"cot_token": COT}),
                                           tokenizer=None)
            self.sampler.bind(None, self.runtime)
        self.prompts = {}
        self.params = {}
        self.ref = NoiseReference()
        self.last_noise = None

    def add(self, reqs) -> None:
        for rid, prompt, sp in reqs:
            self.rs.add_request(req_id=rid, prompt_len=len(prompt), all_token_ids=list(prompt),
                                num_computed_tokens=0, max_tokens=16)
            self.sampler.add_request(self.rs.req_id_to_index[rid], sp)
            self.prompts[rid], self.params[rid] = list(prompt), sp
            if self.runtime is not None:
                self.ref.add(rid, self.runtime.parse_row(sp), sp.seed)
        self.rs.apply_staged_writes()
        self.sampler.apply_staged_writes()

    def idx(self, rids):
        idx_np = np.array([self.rs.req_id_to_index[r] for r in rids], dtype=np.intp)
        return idx_np, torch.from_numpy(idx_np).to(DEV)

    def sample(self, rids, logits, pos, input_ids, return_logprobs=False):
        idx_np, idx = self.idx(rids)
        pos = torch.as_tensor(pos, dtype=torch.int64, device=DEV)
        ids = torch.as_tensor(input_ids, dtype=torch.int32, device=DEV)
        self.ref.before_step()
        out = self.sampler.sample(
            logits.clone(), expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx_np,
            pos=pos, input_ids=ids,
            expanded_local_pos=torch.zeros(len(rids), dtype=torch.int32, device=DEV),
            seq_lens_upper_bound_np=(pos + 1).cpu().numpy(), return_logprobs=return_logprobs)
        if self.runtime is not None:
            self.last_noise = self.ref.noise(rids)
        return out

    def input_batch(self, rids, pos, input_ids):
        B = len(rids)
        idx_np, idx = self.idx(rids)
        pos = torch.as_tensor(pos, dtype=torch.int64, device=DEV)
        ib = InputBatch.make_dummy(B, B, InputBuffers(MAX_REQS, 64, DEV))
        return dataclasses.replace(
            ib, req_ids=list(rids), idx_mapping=idx, idx_mapping_np=idx_np,
            expanded_idx_mapping=idx, positions=pos,
            input_ids=torch.as_tensor(input_ids, dtype=torch.int32, device=DEV),
            seq_lens=(pos + 1).to(torch.int32), seq_lens_cpu_upper_bound=(pos + 1).cpu(),
            logits_indices=torch.arange(B, device=DEV))

    def expected(self, rids, logits, pos, input_ids, attn=None):
        """``entropix_step`` on ``logits`` with the rows' settings and the noise
        of the last :meth:`sample` call (:class:`NoiseReference`)."""
        rows = [self.runtime.parse_row(self.params[r]) for r in rids]
        table = torch.tensor([r.coeffs for r in rows], dtype=torch.float64, device=DEV)
        cot = torch.tensor([r.cot_token for r in rows], dtype=torch.int64, device=DEV)
        pos = torch.as_tensor(pos, dtype=torch.int64, device=DEV)
        ids = torch.as_tensor(input_ids, dtype=torch.int64, device=DEV)
        plen = torch.tensor([len(self.prompts[r]) for r in rids], device=DEV)
        return step.entropix_step(logits, attn, table, cot, (pos >= plen) & (ids == cot),
                                  self.last_noise)


class _RunnerV1(SimpleNamespace):
    """The fields of vLLM's MRV1 runner the sampler reads (weak-referenceable)."""


class HarnessV1:
    """MRV1: ``EntropixSamplerV1`` on a real ``InputBatch`` (vLLM's MRV1 rows,
    generators, sampling metadata) and the runner fields it reads."""

    def __init__(self, engine: dict | None = None):
        self.ib = InputBatchV1(max_num_reqs=MAX_REQS, max_model_len=64, max_num_batched_tokens=64,
                               device=DEV, vocab_size=V, block_sizes=[16],
                               max_num_blocks_per_req=[4])
        self.runner = _RunnerV1(
            device=DEV, input_batch=self.ib, requests={},
            query_start_loc=CpuGpuBuffer(MAX_REQS + 1, dtype=torch.int32, device=DEV,
                                         pin_memory=False),
            input_ids=CpuGpuBuffer(64, dtype=torch.int32, device=DEV, pin_memory=False),
            optimistic_seq_lens_cpu=torch.zeros(MAX_REQS, dtype=torch.int32),
            discard_request_mask=CpuGpuBuffer(MAX_REQS, dtype=torch.bool, device=DEV,
                                              pin_memory=False))
        self.sampler = mrv1.EntropixSamplerV1(logprobs_mode="raw_logprobs")
        self.runtime = EntropixRuntime(_stub_vllm_config(engine or {"cot_token": COT}),
                                       tokenizer=None)
        self.sampler.bind(self.runner, self.runtime)

    def add(self, reqs) -> None:
        for rid, prompt, sp in reqs:
            gen = None
            if sp.seed is not None:   # as vLLM's MRV1 runner makes it
                gen = torch.Generator(device=DEV)
                gen.manual_seed(sp.seed)
            st = CachedRequestState(req_id=rid, prompt_token_ids=list(prompt), mm_features=[],
                                    sampling_params=sp, generator=gen, block_ids=([],),
                                    num_computed_tokens=0, output_token_ids=[])
            self.runner.requests[rid] = st
            self.ib.add_request(st)
        self.ib.refresh_metadata()

    def sample(self, rids, logits, pos, input_ids, discard=()):
        """One decode step of ``rids`` (which must be the batch's rows, in order)."""
        assert list(self.ib.req_ids) == list(rids), (self.ib.req_ids, rids)
        B = len(rids)
        r = self.runner
        r.query_start_loc.np[:B + 1] = np.arange(B + 1)
        r.query_start_loc.copy_to_gpu(B + 1)
        r.input_ids.np[:B] = input_ids
        r.input_ids.copy_to_gpu(B)
        r.optimistic_seq_lens_cpu[:B] = torch.as_tensor(pos) + 1
        r.discard_request_mask.np[:B] = [i in discard for i in range(B)]
        r.discard_request_mask.copy_to_gpu(B)
        return self.sampler(logits.clone(), self.ib.sampling_metadata)


def _logits(kinds, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in kinds:
        if k == "peaked":
            x = torch.randn(V, generator=g) * 0.1
            x[int(torch.randint(V, (1,), generator=g))] = 30.0
        elif k == "uniform":
            x = torch.zeros(V)
        elif k == "bimodal":
            x = torch.randn(V, generator=g) * 0.5 - 4.0
            x[torch.randperm(V, generator=g)[:6]] = torch.tensor([6.0, 6.0, 5.5, 2.0, 1.0, 0.5])
        else:  # "random"
            x = torch.randn(V, generator=g) * 2.0
        rows.append(x)
    return torch.stack(rows).to(DEV)


PROMPT = [1, 2, 3, 4, 5]


class TestMRV2Sampler:
    """Collected in the child process only (see the end of this file)."""

    @pytest.fixture(autouse=True)
    def _setup_ok(self):
        if _SETUP_ERROR is not None:
            pytest.skip(f"vLLM's MRV2 classes cannot be built here: {_SETUP_ERROR}")

    def test_entropix_rows_equal_entropix_step(self):
        h = Harness()
        sps = [SamplingParams(seed=11),
               SamplingParams(temperature=0.2, top_k=3, top_p=0.5, min_p=0.3, seed=12),
               SamplingParams(seed=13, extra_args={"entropix_n_adaptive_samples": 2,
                                                   "entropix_temperature": 1.1}),
               SamplingParams(temperature=0.5),            # no seed: vLLM draws one
               SamplingParams(seed=15)]
        rids = [f"e{i}" for i in range(5)]
        h.add([(r, PROMPT, sp) for r, sp in zip(rids, sps)])
        # vLLM's SamplingStates hold the neutral copy; the processors the request's params.
        ss, i1 = h.sampler.sampling_states, h.rs.req_id_to_index["e1"]
        assert (ss.temperature.np[i1], ss.top_k.np[i1], ss.top_p.np[i1], ss.min_p.np[i1]) == (
            1.0, V, 1.0, 0.0)
        assert ss.seeds.np[i1] == 12 and patches.patched(vars(ss)["add_request"])
        kinds = ["peaked", "random", "random", "bimodal", "uniform"]
        for step_no in range(3):
            logits = _logits(kinds, seed=step_no)
            pos = [5 + step_no] * 5
            ids = [40, 41, 42, 43, 44]
            tokens, processed = h.sample(rids, logits, pos, ids, return_logprobs=True)
            exp = h.expected(rids, logits, pos, ids)
            assert tokens.dtype == torch.int64 and tokens.shape == (5,)
            assert torch.equal(tokens, exp.tokens), (tokens, exp.tokens)
            # Temperature 1, nothing filtered: the request's own temperature,
            # top_k, top_p and min_p (row 1) are not applied.
            assert torch.equal(processed, logits)
            assert int(exp.params.branch[0]) == ARGMAX and int(exp.params.branch[4]) == INSERT_COT
        # The per-request overrides are in effect: with the engine defaults the
        # same step differs (row 2's temperature coefficient and draw count).
        h2 = Harness()
        h2.add([(r, PROMPT, SamplingParams(seed=11 + i)) for i, r in enumerate(rids)])
        logits = _logits(["random"] * 5, seed=9)
        diff = [h.sample(rids, logits, [9 + t] * 5, [40] * 5)[0][2] !=
                h2.sample(rids, logits, [9 + t] * 5, [40] * 5)[0][2] for t in range(6)]
        assert any(bool(d) for d in diff)

    def test_stock_rows_equal_vllm_sampler(self):
        reqs = [("e0", PROMPT, SamplingParams(seed=21)),
                ("s1", PROMPT, SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=22,
                                              extra_args={"entropix": False})),
                ("e2", PROMPT, SamplingParams(seed=23, extra_args={"entropix": True})),
                ("s3", PROMPT, SamplingParams(temperature=0.0, extra_args={"entropix": "false"})),
                ("s4", PROMPT, SamplingParams(temperature=1.3, min_p=0.05, seed=24,
                                              extra_args={"entropix": 0})),
                # An Entropix request's own temperature 0 / top_k 1: vLLM's greedy token.
                ("g5", PROMPT, SamplingParams(temperature=0.0)),
                ("g6", PROMPT, SamplingParams(top_k=1, seed=25))]
        ours, stock = Harness(), Harness(entropix=False)
        ours.add(reqs)
        stock.add(reqs)
        rids = [r for r, _, _ in reqs]
        stock_rows, e_rows = [1, 3, 4, 5, 6], [0, 2]
        discriminated = False
        for step_no in range(4):
            logits = _logits(["random", "random", "bimodal", "random", "random", "random",
                              "random"], seed=step_no)
            pos, ids = [5 + step_no] * 7, [9] * 7
            tokens, processed = ours.sample(rids, logits, pos, ids, return_logprobs=True)
            ref, ref_processed = stock.sample(rids, logits, pos, ids, return_logprobs=True)
            assert torch.equal(tokens[stock_rows], ref[stock_rows])
            assert torch.equal(processed[stock_rows], ref_processed[stock_rows])
            exp = ours.expected(rids, logits, pos, ids)
            assert torch.equal(tokens[e_rows], exp.tokens[e_rows])
            discriminated |= bool((exp.tokens[stock_rows] != ref[stock_rows]).any())
        assert discriminated  # Entropix tokens on stock rows would have been caught
        # A batch of stock rows only is vLLM's sampling, untouched.
        sub = [rids[i] for i in stock_rows]
        n = len(sub)
        logits = _logits(["random"] * n, seed=7)
        a = ours.sample(sub, logits, [8] * n, [9] * n, return_logprobs=True)
        b = stock.sample(sub, logits, [8] * n, [9] * n, return_logprobs=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    def test_allowed_tokens_and_logit_bias_reach_entropix(self):
        h = Harness()
        rids = ["allowed", "bias", "penalty", "plain"]
        h.add([("allowed", PROMPT, SamplingParams(seed=1, allowed_token_ids=[3, 50, 77])),
               ("bias", PROMPT, SamplingParams(seed=2, logit_bias={10: -100.0})),
               ("penalty", [1, 2, 10, 4, 5], SamplingParams(seed=3, repetition_penalty=20.0)),
               ("plain", PROMPT, SamplingParams(seed=4))])
        logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5)) * 0.1
        logits[:, 10] = 30.0           # the raw argmax of every row
        logits[0, 50] = 25.0           # the best allowed token of row 0
        logits[1, 60] = 24.0           # the runner-up of row 1
        logits[2, 60] = 20.0           # row 2: 10 is a prompt token, 30 / 20 < 20
        logits = logits.to(DEV)
        tokens, processed = h.sample(rids, logits, [5] * 4, [9] * 4, return_logprobs=True)
        assert tokens.tolist() == [50, 60, 60, 10]
        assert torch.equal(tokens, processed.argmax(dim=-1))
        assert torch.isinf(processed[0, 10]) and processed[0, 10] < 0
        assert float(processed[2, 10]) == pytest.approx(1.5)
        exp = h.expected(rids, processed, [5] * 4, [9] * 4)
        assert torch.equal(tokens, exp.tokens)
        assert (exp.params.branch == ARGMAX).all()

    def test_cot_token_only_after_a_generated_cot_token(self):
        h = Harness()
        h.add([("gen", PROMPT, SamplingParams(seed=1)),
               ("prompt_end", [1, 2, 3, 4, COT], SamplingParams(seed=2)),
               ("other", PROMPT, SamplingParams(seed=3)),
               ("own_cot", PROMPT, SamplingParams(seed=4, extra_args={"entropix_cot_token": 9}))])
        rids = ["gen", "prompt_end", "other", "own_cot"]
        logits = _logits(["uniform"] * 4)
        # gen: its last token (position 6 > prompt) was the CoT token -> a draw;
        # prompt_end: the CoT id is the last *prompt* token (position 4) -> CoT;
        # other: last token 9 -> CoT; own_cot: CoT id 9, last token 7 -> 9.
        pos, ids = [6, 4, 6, 6], [COT, COT, 9, COT]
        tokens, _ = h.sample(rids, logits, pos, ids)
        exp = h.expected(rids, logits, pos, ids)
        assert (exp.params.branch == INSERT_COT).all()
        assert int(tokens[0]) != COT
        assert tokens[1:].tolist() == [COT, COT, 9]
        assert torch.equal(tokens, exp.tokens)

    def test_seeded_rows_do_not_depend_on_the_batch(self):
        h = Harness()
        h.add([("a", PROMPT, SamplingParams(seed=1234)),
               ("twin", PROMPT, SamplingParams(seed=1234)),   # a's seed, batched
               ("b", PROMPT, SamplingParams(seed=99)),
               ("c", PROMPT, SamplingParams(seed=5, extra_args={"entropix": False})),
               ("a2", PROMPT, SamplingParams(seed=4321))])
        alone, batched, other = [], [], []
        for t in range(6):
            x = _logits(["random"], seed=100 + t)
            alone.append(int(h.sample(["a"], x, [5 + t], [9])[0][0]))
            xb = torch.cat([_logits(["bimodal", "random"], seed=t), x])
            batched.append(int(h.sample(["b", "c", "twin"], xb, [7, 3 + t, 5 + t], [9] * 3)[0][2]))
            other.append(int(h.sample(["a2"], x, [5 + t], [9])[0][0]))
        assert alone == batched
        assert alone != other  # the seed decides the draws

    def test_logprobs_belong_to_returned_tokens(self):
        for mode in ("raw_logprobs", "processed_logprobs"):
            h = Harness(logprobs_mode=mode)
            h.add([("e0", PROMPT, SamplingParams(seed=1, logprobs=3)),
                   ("s1", PROMPT, SamplingParams(seed=2, logprobs=3, temperature=0.7,
                                                 extra_args={"entropix": False})),
                   ("e2", PROMPT, SamplingParams(seed=3, logprobs=2,
                                                 allowed_token_ids=list(range(0, V, 2))))])
            rids = ["e0", "s1", "e2"]
            logits = _logits(["random", "random", "random"], seed=3)
            _, processed = h.sample(rids, logits, [6, 6, 6], [9, 9, 9], return_logprobs=True)
            h.ref.before_step()
            out = h.sampler(logits.clone(), h.input_batch(rids, [6, 6, 6], [9, 9, 9]))
            h.last_noise = h.ref.noise(rids)
            sampled = out.sampled_token_ids[:, 0]
            lp = out.logprobs_tensors
            assert torch.equal(lp.logprob_token_ids[:, 0].long(), sampled)
            base = logits if mode == "raw_logprobs" else processed
            ref = torch.log_softmax(base.float(), dim=-1).gather(1, sampled[:, None])[:, 0]
            assert torch.allclose(lp.logprobs[:, 0], ref, atol=1e-5)
            exp = h.expected(rids, processed, [6, 6, 6], [9, 9, 9])
            assert torch.equal(sampled[[0, 2]], exp.tokens[[0, 2]])
            assert int(sampled[2]) % 2 == 0
            if mode == "processed_logprobs":  # Entropix rows: masked logits at T = 1
                assert torch.isinf(lp.logprobs[2, 1:]).sum() == 0
                assert torch.isinf(processed[2, 1::2]).all()
            assert torch.equal(out.num_sampled.cpu(), torch.ones(3, dtype=out.num_sampled.dtype))

    def test_attention_figures_reach_the_step(self):
        h = Harness()
        rids = [f"r{i}" for i in range(6)]
        h.add([(r, PROMPT, SamplingParams(seed=40 + i)) for i, r in enumerate(rids)])
        figures = torch.tensor([[3.0, 0.5, 4.0, 1.0, 2.5, 0.1],      # attn entropy
                                [2.0, 0.1, 3.0, 0.5, 1.5, 0.0],      # attn varentropy
                                [0.9, 0.1, 0.5, 0.0, 0.3, 0.7],      # agreement
                                [5.0, 0.2, 3.0, 1.0, 4.0, 0.5]],     # interaction strength
                               device=DEV)
        attention.install(_stub_vllm_config({}), -1)
        try:
            st = attention._STATE
            st.layer_name, st.num_rows = "model.layers.0.self_attn.attn", 6
            st.buf = attention._Buffers(MAX_REQS, 1, 1, torch.float32, DEV)
            st.buf.stats[:, :6] = figures
            differs = False
            for t in range(4):
                logits = _logits(["random", "bimodal", "random", "random", "bimodal", "random"],
                                 seed=20 + t)
                tokens, _ = h.sample(rids, logits, [5 + t] * 6, [9] * 6)
                exp = h.expected(rids, logits, [5 + t] * 6, [9] * 6, attn=AttnStats(*figures))
                assert torch.equal(tokens, exp.tokens)
                without = h.expected(rids, logits, [5 + t] * 6, [9] * 6)
                differs |= not torch.equal(exp.tokens, without.tokens)
            assert differs
        finally:
            attention.uninstall()

    def test_runner_patch(self):
        import inspect

        import vllm.v1.worker.gpu.model_runner as runner_mod

        from entropix_vllm.integration import engine

        spec = next(r for r in patches.RUNNERS if r.name == "MRV2")
        assert spec.build_method == "load_model"
        hooks = engine.worker_hooks()
        assert patches.apply_runner(spec, hooks) is True
        cls = runner_mod.GPUModelRunner
        init, load = cls.__init__, cls.load_model
        assert patches.apply_runner(spec, hooks) is True
        assert cls.__init__ is init and cls.load_model is load          # idempotent
        assert all(patches.patched(f) for f in (init, load, cls.initialize_kv_cache))
        # This vLLM builds the sampler in load_model through the module-level name.
        src = inspect.getsource(load.__wrapped__)
        assert "self.sampler = Sampler(" in src
        ours = patches.sampler_class(spec)
        assert ours is mrv2.EntropixSamplerV2
        saved = runner_mod.Sampler
        with patches.rebound_sampler(runner_mod, ours):
            assert runner_mod.Sampler is ours
        assert runner_mod.Sampler is saved
        with pytest.raises(KeyError):
            with patches.rebound_sampler(runner_mod, ours):
                raise KeyError("build failed")
        assert runner_mod.Sampler is saved
        # A runner whose sampler is not ours (watermarking, custom samplers) is refused.
        stock = Harness(entropix=False).sampler
        runtime = Harness().runtime
        with pytest.raises(RuntimeError, match="instead of its Sampler"):
            patches.bind_runner_sampler(SimpleNamespace(sampler=stock), runtime, ours)
        patches.bind_runner_sampler(SimpleNamespace(sampler=None), runtime, ours)
        mine = Harness().sampler
        patches.bind_runner_sampler(SimpleNamespace(sampler=mine), runtime, ours)
        assert mine.runtime is runtime
        assert isinstance(mine, Sampler)

    def test_no_host_sync_in_the_mrv2_step(self):
        """The MRV2 Entropix path (all-Entropix fast path and a mixed batch) issues
        no host sync and no blocking copy from the project's code (vLLM's own
        MRV2 code and the interpreter's kernel runs are not judged)."""
        from sync_audit import SyncAudit

        h = Harness()
        h.add([("e0", PROMPT, SamplingParams(seed=1)), ("e1", PROMPT, SamplingParams()),
               ("s2", PROMPT, SamplingParams(seed=3, extra_args={"entropix": False}))])
        for rids in (["e0", "e1"], ["e0", "s2", "e1"]):
            B = len(rids)
            idx_np, idx = h.idx(rids)
            pos = torch.full((B,), 7, dtype=torch.int64, device=DEV)
            ids = torch.full((B,), 9, dtype=torch.int32, device=DEV)
            args = dict(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx_np,
                        pos=pos, input_ids=ids,
                        expanded_local_pos=torch.zeros(B, dtype=torch.int32, device=DEV),
                        seq_lens_upper_bound_np=np.full(B, 8))
            logits = _logits(["random"] * B, seed=B)
            h.sampler.sample(logits.clone(), **args)                     # warm
            with SyncAudit() as audit:
                h.sampler.sample(logits.clone(), **args)
            assert audit.ours() == [], [str(e) for e in audit.ours()]
            assert audit.ops > 10

    def test_warm_up_moves_no_random_generator(self):
        """The start-up warm-up (the step on dummy logits) leaves the default
        generator where it was: the first real step draws the same noise with
        or without it (an unseeded row's tokens depend on that)."""
        h = Harness()
        rng_state = torch.cuda.get_rng_state if HAS_CUDA else torch.get_rng_state
        state = rng_state()
        h.runtime.warm_up(_logits(["random"] * 4, seed=1).to(DEV))
        assert h.runtime.warmed_rows == [4, 1]
        assert torch.equal(rng_state(), state)

    # -- MRV1 (EntropixSamplerV1 on a real MRV1 InputBatch) ---------------------------
    def test_mrv1_entropix_rows_equal_entropix_step_and_stock_rows_vllms(self):
        reqs = [("e0", PROMPT, SamplingParams(seed=31)),
                ("s1", PROMPT, SamplingParams(temperature=0.8, top_k=40, seed=32,
                                              extra_args={"entropix": False})),
                ("e2", PROMPT, SamplingParams(seed=33, extra_args={"entropix_n_adaptive_samples": 3})),
                ("e3", PROMPT, SamplingParams(seed=34, extra_args={"entropix_cot_token": 9}))]
        h = HarnessV1()
        h.add(reqs)
        ref = NoiseReference()
        for rid, _, sp in reqs:
            ref.add(rid, h.runtime.parse_row(sp), sp.seed)
        # vLLM's own MRV1 sampler on a twin batch: the stock row's tokens
        stock_ib = InputBatchV1(max_num_reqs=MAX_REQS, max_model_len=64,
                                max_num_batched_tokens=64, device=DEV, vocab_size=V,
                                block_sizes=[16], max_num_blocks_per_req=[4])
        for rid, prompt, sp in reqs:
            g = torch.Generator(device=DEV)
            g.manual_seed(sp.seed)
            stock_ib.add_request(CachedRequestState(
                req_id=rid, prompt_token_ids=list(prompt), mm_features=[], sampling_params=sp,
                generator=g, block_ids=([],), num_computed_tokens=0, output_token_ids=[]))
        stock_ib.refresh_metadata()
        stock = SamplerV1(logprobs_mode="raw_logprobs")
        rids = [r for r, _, _ in reqs]
        for t in range(4):
            logits = _logits(["random", "random", "bimodal", "uniform"], seed=50 + t)
            pos, ids = [5 + t] * 4, [9, 9, 9, COT if t else 9]
            ref.before_step()
            out = h.sample(rids, logits, pos, ids)
            noise = ref.noise(rids)
            tokens = out.sampled_token_ids[:, 0]
            rows = [h.runtime.parse_row(sp) for _, _, sp in reqs]
            table = torch.tensor([r.coeffs for r in rows], dtype=torch.float64, device=DEV)
            cot = torch.tensor([r.cot_token for r in rows], dtype=torch.int64, device=DEV)
            # the previous token is generated (position past the prompt) and the CoT token
            prev = (torch.tensor(pos, device=DEV) >= len(PROMPT)) & (
                torch.tensor(ids, device=DEV) == cot)
            exp = step.entropix_step(logits, None, table, cot, prev, noise)
            assert torch.equal(tokens[[0, 2, 3]].long(), exp.tokens[[0, 2, 3]]), (t, tokens,
                                                                                 exp.tokens)
            want = stock(logits.clone(), stock_ib.sampling_metadata).sampled_token_ids[:, 0]
            assert int(tokens[1]) == int(want[1])

    def test_mrv1_discarded_sample_moves_no_generator(self):
        h = HarnessV1()
        h.add([("chunk", PROMPT, SamplingParams(seed=7)),
               ("s", PROMPT, SamplingParams(seed=8, extra_args={"entropix": False}))])
        gens = [h.runner.requests[r].generator for r in ("chunk", "s")]
        before = [g.get_state() for g in gens]
        h.sample(["chunk", "s"], _logits(["random", "random"], seed=1), [2, 2], [9, 9],
                 discard=(0, 1))
        assert all(torch.equal(g.get_state(), b) for g, b in zip(gens, before))
        h.sample(["chunk", "s"], _logits(["random", "random"], seed=2), [5, 5], [9, 9])
        assert not any(torch.equal(g.get_state(), b) for g, b in zip(gens, before))

    # -- both runners ------------------------------------------------------------------
    def test_same_seed_same_tokens_on_both_runners(self):
        reqs = [("a", PROMPT, SamplingParams(seed=101)),
                ("b", PROMPT, SamplingParams(temperature=0.3, seed=102,
                                             extra_args={"entropix_n_adaptive_samples": 4})),
                ("stock", PROMPT, SamplingParams(seed=103, extra_args={"entropix": False})),
                ("c", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(seed=104)),   # chunked prefill
                ("d", PROMPT, SamplingParams(seed=105, extra_args={"entropix_top_k": 5}))]
        v1, v2 = HarnessV1(), Harness()
        v1.add(reqs)
        v2.add(reqs)
        rids = [r for r, _, _ in reqs]
        got1, got2 = [], []
        kinds = ["random", "bimodal", "random", "random", "uniform"]
        for t in range(6):
            logits = _logits(kinds, seed=200 + t)
            # "c": its first step is a chunk of its prefill (position 3 of 8): no token
            pos = [5 + t, 5 + t, 5 + t, 3 if t == 0 else 7 + t, 5 + t]
            ids = [9, COT if t % 2 else 9, 9, 9, COT]
            a = v1.sample(rids, logits, pos, ids, discard=(3,) if t == 0 else ()).sampled_token_ids[:, 0]
            b = v2.sample(rids, logits, pos, ids)[0]
            keep = [0, 1, 4] + ([] if t == 0 else [3])
            got1.append(a[keep].tolist())
            got2.append(b[keep].tolist())
        assert got1 == got2
        assert len({tuple(x) for x in got1}) > 1     # the rows moved: not a constant


if not IN_CHILD:
    # Run only by test_mrv2_sampler_on_vllm_classes_in_child_process.
    del TestMRV2Sampler
