"""The Entropix sampler in vLLM's offline engine (``LLM(...)``) on the bundled
model, CPU: seeded requests whose prompts are prefilled in chunks.

vLLM 0.32's CPU runner rewinds a seeded request's generator with
``set_offset`` after each discarded partial-prefill sample, which CPU
generators refuse: the engine dies (stock sampler included; see
``mrv1.guard_cpu_generator_rewind``). With Entropix on, such requests must
complete, and their tokens must not depend on how the prompt was chunked: the
second run of the same prompt is a prefix-cache hit (fewer chunks), and a run
inside a different batch still gives the same tokens.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from entropix_vllm import bundled  # noqa: E402

LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones."
                for i in range(110))
QUESTION = LONG + "\nWhich item holds the most stones? Answer briefly."


@pytest.fixture(scope="module")
def llm():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM

    engine = LLM(bundled.bundled_model_path(), dtype="float32", max_model_len=4096,
                 max_num_batched_tokens=512, enable_chunked_prefill=True, max_num_seqs=8,
                 additional_config={"sampler": "entropix"})
    yield engine
    del engine


def _ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_seeded_chunked_prefill_completes_and_is_reproducible(llm):
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    assert len(tok.encode(QUESTION)) > 2 * 512      # three prefill chunks
    sp = SamplingParams(max_tokens=24, seed=3, ignore_eos=True)
    first = _ids(llm.generate([QUESTION], sp))       # chunked prefill
    again = _ids(llm.generate([QUESTION], sp))       # prefix-cache hit: other chunking
    assert first == again and len(first[0]) == 24
    others = ["Name a colour.", "Count to five.", QUESTION.replace("stones", "pebbles")]
    mixed = _ids(llm.generate([QUESTION] + others, [sp] + [SamplingParams(max_tokens=24, seed=9, ignore_eos=True)] * 3))
    assert mixed[0] == first[0]


def test_seeded_stock_rows_in_an_entropix_engine_survive_chunking(llm):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=16, seed=5, temperature=0.8, ignore_eos=True,
                        extra_args={"entropix": False})
    a = _ids(llm.generate([QUESTION.replace("box", "crate")], sp))
    b = _ids(llm.generate([QUESTION.replace("box", "crate")], sp))
    assert a == b and len(a[0]) == 16
