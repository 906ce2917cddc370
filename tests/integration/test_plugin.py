"""The plugin's hooks into vLLM (entropix_vllm/integration/plugin.py, engine.py),
in-process: the version gate, the real ``--sampler`` flag on vLLM's own argument
parser, engine-config checks, the per-request key validation (the HTTP 400
path) and the runner choice (MRV1 / MRV2) with its refusals.
The served behaviour is tested end to end in test_e2e_server.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from entropix_vllm import bundled  # noqa: E402
from entropix_vllm.integration import plugin  # noqa: E402

plugin.register()


def test_version_gate():
    assert plugin.supported_version("0.32.0")
    assert plugin.supported_version("0.32.1+cpu")
    assert plugin.supported_version("0.33.0")
    assert not plugin.supported_version("0.31.2")
    assert not plugin.supported_version("0.34.0")
    assert not plugin.supported_version("dev")


def _parse(argv):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return parser.parse_args([a if a != "m" else bundled.bundled_model_path() for a in argv])


def test_sampler_flag_reaches_additional_config():
    args = _parse(["--model", "m", "--sampler", "entropix",
                   "--additional-config.entropix.high_ent_thresh=4.5"])
    ea = AsyncEngineArgs.from_cli_args(args)
    assert ea.additional_config["sampler"] == "entropix"
    assert float(ea.additional_config["entropix"]["high_ent_thresh"]) == 4.5
    # absent flag: additional_config untouched
    ea = AsyncEngineArgs.from_cli_args(_parse(["--model", "m"]))
    assert "sampler" not in (ea.additional_config or {})
    # the dotted additional-config form alone works too
    ea = EngineArgs.from_cli_args(_parse(["--model", "m", "--additional-config.sampler=entropix"]))
    assert ea.additional_config["sampler"] == "entropix"


def test_sampler_flag_reaches_processes_started_from_the_parsed_arguments():
    """`vllm serve --data-parallel-size N` starts more API servers from the parsed
    arguments; they build engine arguments before loading any plugin (vLLM's
    own from_cli_args, unwrapped): the sampler must be in those arguments."""
    from entropix_vllm.integration import patches

    args = _parse(["--model", "m", "--sampler", "entropix",
                   "--additional-config.entropix.attn_layer=3"])
    AsyncEngineArgs.from_cli_args(args)             # the parent (plugin loaded)
    unwrapped = patches.original(AsyncEngineArgs, "from_cli_args")
    child = unwrapped(AsyncEngineArgs, args)         # a child without the plugin yet
    assert child.additional_config["sampler"] == "entropix"
    assert int(child.additional_config["entropix"]["attn_layer"]) == 3


def test_sampler_flag_rejects_bad_values_and_conflicts():
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--sampler", "entropx"])
    args = _parse(["--model", "m", "--sampler", "default", "--additional-config.sampler=entropix"])
    with pytest.raises(ValueError, match="--sampler default contradicts"):
        AsyncEngineArgs.from_cli_args(args)


@pytest.fixture(scope="module")
def vllm_config():
    ea = EngineArgs(model=bundled.bundled_model_path(), dtype="float32", max_model_len=512,
                    additional_config={"sampler": "entropix"})
    return ea.create_engine_config()


def test_engine_config_errors_name_the_key():
    path = bundled.bundled_model_path()
    ea = EngineArgs(model=path, dtype="float32", max_model_len=512,
                    additional_config={"sampler": "entropix", "entropix": {"top_p": 1.5}})
    with pytest.raises(ValueError, match=r"additional_config\.entropix\.top_p"):
        ea.create_engine_config()
    ea = EngineArgs(model=path, dtype="float32", max_model_len=512,
                    additional_config={"sampler": "entropix", "entropix": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"additional_config\.entropix\.bogus"):
        ea.create_engine_config()


def test_v1_model_runner_with_entropix(vllm_config):
    assert vllm_config.use_v2_model_runner is False


def test_request_validation(vllm_config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled.bundled_model_path())
    ok = plugin.validate_request_args({"entropix": "true", "entropix_top_p": 0.8, "other": 1},
                                      vllm_config, tok)
    assert ok["entropix_top_p"] == 0.8 and ok["other"] == 1
    resolved = plugin.validate_request_args({"entropix_cot_token": " ..."}, vllm_config, tok)
    assert resolved["entropix_cot_token"] == tok.encode(" ...", add_special_tokens=False)[0]
    cases = {
        "entropix_top_p": 0.0, "entropix_temperature": "hot", "entropix_nope": 1,
        "entropix": "maybe", "entropix_top_k": 1000, "entropix_cot_token": "several words here",
        "entropix_n_adaptive_samples": 2.5,
    }
    for key, value in cases.items():
        with pytest.raises(VLLMValidationError, match=f"vllm_xargs.{key}") as e:
            plugin.validate_request_args({key: value}, vllm_config, tok)
        assert e.value.parameter == f"vllm_xargs.{key}"
    with pytest.raises(VLLMValidationError, match=r"entropix_cot_token.*\[0, 49152\)"):
        plugin.validate_request_args({"entropix_cot_token": 10 ** 6}, vllm_config, tok)


def test_entropix_keys_refused_without_the_sampler():
    ea = EngineArgs(model=bundled.bundled_model_path(), dtype="float32", max_model_len=512)
    cfg = ea.create_engine_config()
    assert plugin.validate_request_args({"other": 1}, cfg) == {"other": 1}
    with pytest.raises(VLLMValidationError, match="does not run the Entropix sampler"):
        plugin.validate_request_args({"entropix": True}, cfg)


def test_speculative_decoding_refused():
    ea = EngineArgs(model=bundled.bundled_model_path(), dtype="float32", max_model_len=512,
                    additional_config={"sampler": "entropix"},
                    speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                        "prompt_lookup_max": 3})
    with pytest.raises(Exception, match="speculative decoding"):
        ea.create_engine_config()


# ----------------------------------------------------------------------------
# Runner choice (engine.py)
# ----------------------------------------------------------------------------
def test_runner_choice_policy():
    from entropix_vllm.integration.engine import choose_runner

    # GPU, vLLM would run MRV2, nothing blocks MRV1: the plugin prefers MRV1.
    c = choose_runner(True, None, [])
    assert (c.v2, c.by) == (False, "plugin") and "VLLM_USE_V2_MODEL_RUNNER=1" in c.reason
    # vLLM says MRV1 cannot serve the engine: MRV2, naming why.
    c = choose_runner(True, None, ["Step5"])
    assert (c.v2, c.by) == (True, "vllm") and "Step5" in c.reason
    # vLLM runs MRV1 anyway (CPU, no Triton); the user's variable always wins.
    assert choose_runner(False, None, ["x"]).v2 is False
    assert choose_runner(True, "1", []) == choose_runner(True, "1", ["x"])
    assert choose_runner(True, "1", []).by == "user" and choose_runner(False, "0", []).v2 is False


def test_runner_choice_on_this_cpu_engine(vllm_config, monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    c = plugin.runner_choice(vllm_config)
    assert (c.v2, c.by) == (False, "vllm")       # vLLM's own choice here: no Triton CPU backend
    assert plugin.v2_refusal(vllm_config, "prompt_logprob_token_ids") is None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert plugin.runner_choice(vllm_config).by == "user"


def test_requests_that_need_mrv2_are_refused_naming_why(vllm_config, monkeypatch):
    """What a GPU engine the plugin moved to MRV1 answers (vLLM's own choice: MRV2)."""
    from entropix_vllm.integration import engine

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    why = engine.v2_refusal(vllm_config, "prompt_logprob_token_ids", vllm_v2=True)
    assert why.startswith("prompt_logprob_token_ids needs vLLM's V2 model runner")
    assert "VLLM_USE_V2_MODEL_RUNNER=1" in why
    # MRV2 chosen (vLLM says MRV1 cannot serve it) or the user's choice: nothing refused.
    import copy
    blocked = copy.copy(vllm_config)
    blocked.parallel_config = copy.copy(vllm_config.parallel_config)
    blocked.parallel_config.enable_batch_sharded_sampling = True
    assert engine.runner_choice(blocked, True).v2 is True
    assert engine.v2_refusal(blocked, "prompt_logprob_token_ids", vllm_v2=True) is None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert engine.v2_refusal(vllm_config, "prompt_logprob_token_ids", vllm_v2=True) is None



def test_check_workers_names_workers_without_the_plugin():
    """The engine core asks every worker, once they are built, whether the
    plugin built its runner (a Ray node without the package, or with it only on
    its path, would otherwise sample with vLLM's sampler, silently)."""
    from types import SimpleNamespace as NS

    from entropix_vllm.integration import engine, patches, vllm_api

    class Executor:
        def __init__(self, answer, sampler="entropix"):
            self.vllm_config = NS(additional_config={"sampler": sampler})
            self.answer, self.calls = answer, 0

        def collective_rpc(self, fn):
            self.calls += 1
            if isinstance(self.answer, Exception):
                raise self.answer
            return [fn(w) for w in self.answer]

    ours = NS(model_runner=NS(_entropix_runtime=object()))
    stock = NS(model_runner=NS())
    engine.check_workers(Executor([ours, ours]))
    with pytest.raises(engine.EntropixEngineError, match=r"not loaded in worker\(s\) \[1\] of 2"):
        engine.check_workers(Executor([ours, stock]))
    with pytest.raises(engine.EntropixEngineError,
                       match="some workers .ModuleNotFoundError: No module named 'entropix_vllm'"):
        engine.check_workers(Executor(ModuleNotFoundError("No module named 'entropix_vllm'")))
    plain = Executor([stock], sampler="default")
    engine.check_workers(plain)                 # not an Entropix engine: nothing asked
    assert plain.calls == 0
    # Bound to every executor once the plugin is registered.
    plugin.register()
    assert patches.patched(vllm_api.executor_cls().get_kv_cache_specs)
