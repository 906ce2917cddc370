"""The bundled model (entropix_vllm/bundled.py): its folder, HF transformers on it,
and vLLM's greedy output against HF's on the same prompts.

The folder is built by scripts/setup.sh (``python -m entropix_vllm.bundled``); if
it is missing, the first test here builds it (about a minute).
"""

from __future__ import annotations

import json
import os

import pytest

from entropix_vllm import bundled

PROMPTS = ["What is the capital of France?", "Name three primary colours."]
MAX_TOKENS = 12


def test_cache_dir_and_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPIX_VLLM_CACHE", str(tmp_path / "c"))
    assert bundled.cache_dir() == tmp_path / "c"
    assert not bundled.is_built()
    with pytest.raises(FileNotFoundError, match="python -m entropix_vllm.bundled"):
        bundled.bundled_model_path(build=False)
    assert bundled.main(["--check"]) == 1
    monkeypatch.delenv("ENTROPIX_VLLM_CACHE")
    assert bundled.cache_dir() == bundled.Path.home() / ".cache" / "entropix-vllm"


@pytest.fixture(scope="module")
def model_path():
    path = bundled.bundled_model_path()
    assert bundled.is_built(bundled.Path(path))
    return path


def test_folder_is_smollm2_135m(model_path):
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["vocab_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["hidden_size"]) == (49152, 30, 9, 3, 576)
    assert cfg["tie_word_embeddings"] is True
    assert os.path.isfile(os.path.join(model_path, "model.safetensors"))
    assert "Apache License" in open(os.path.join(model_path, "LICENSE")).read()


@pytest.fixture(scope="module")
def hf(model_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return tok, model


def _chat_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def hf_greedy(hf):
    """HF greedy continuations of the chat-formatted PROMPTS: [(prompt ids, tokens)]."""
    import torch
    tok, model = hf
    res = []
    for prompt in PROMPTS:
        ids = _chat_ids(tok, prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        gen = out[0, len(ids):].tolist()
        eos = tok.eos_token_id
        res.append((ids, gen[: gen.index(eos) + 1] if eos in gen else gen))
    return res


def test_tokenizer_and_chat_template(hf):
    tok, _ = hf
    assert len(tok) == 49152
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_hf_answers_sensibly(hf, hf_greedy):
    tok, _ = hf
    assert "Paris" in tok.decode(hf_greedy[0][1], skip_special_tokens=True)


def test_vllm_greedy_matches_hf(hf_greedy, model_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [ids for ids, _ in hf_greedy]
    want = [gen for _, gen in hf_greedy]
    # No compilation (mode 0): the engine starts in seconds; the weights, tokenizer
    # and chat template are what this test is about.
    llm = LLM(model=model_path, dtype="float32", max_model_len=512, max_num_seqs=4, seed=0,
              compilation_config={"mode": 0})
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        got = [list(o.outputs[0].token_ids) for o in outs]
        # The server's own chat path: the tokenizer and template vLLM loads from the folder.
        chat = llm.chat([{"role": "user", "content": PROMPTS[0]}],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finally:
        del llm
    assert got == want, (got, want)
    assert list(chat[0].prompt_token_ids) == prompts[0]
    assert "Paris" in chat[0].outputs[0].text
