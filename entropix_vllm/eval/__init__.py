"""Side-by-side sampler evaluation against an OpenAI-compatible server (``python -m entropix_vllm.eval``)."""
