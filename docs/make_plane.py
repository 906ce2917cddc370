"""Regenerate docs/entropix_plane.png: ten chat prompts served by the bundled model
with the Entropix sampler and the ``classic`` preset, SPEC section 3's defaults
(vLLM offline engine, CPU, fp32, seed 7, 120 tokens each), traced, then drawn by
``python -m entropix_vllm.report --plot`` with that preset's thresholds.

    .venv/bin/python docs/make_plane.py [TRACE] [PNG] [PRESET]

PRESET: a preset name (default ``classic``; ``smollm2-135m-instruct`` draws the
bundled model's tuned preset).
"""

import os
import subprocess
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain why the sky is blue.", "List three uses of a paperclip.",
           "What is 17 times 23?", "Tell me a story about a robot who learns to paint.",
           "Translate 'good morning' into Spanish and German.", "What should I cook tonight?",
           "Summarise the plot of Romeo and Juliet in two sentences.", "Give me a riddle."]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    trace = sys.argv[1] if len(sys.argv) > 1 else "/tmp/entropix_plane.jsonl"
    png = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "entropix_plane.png")
    preset = sys.argv[3] if len(sys.argv) > 3 else "classic"
    if os.path.exists(trace):
        os.remove(trace)
    from vllm import LLM, SamplingParams

    from entropix_vllm.bundled import bundled_model_path

    llm = LLM(bundled_model_path(), dtype="float32", max_model_len=2048, max_num_seqs=16,
              additional_config={"sampler": "entropix",
                                 "entropix": {"trace_path": trace, "preset": preset}})
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                    SamplingParams(max_tokens=120, seed=7))
    for p, o in zip(PROMPTS, outs):
        print(f"### {p}\n{o.outputs[0].text.strip()}\n")
    del llm
    subprocess.run([sys.executable, "-m", "entropix_vllm.report", trace, "--plot", png,
                    "--preset", preset], check=True)


if __name__ == "__main__":
    main()
