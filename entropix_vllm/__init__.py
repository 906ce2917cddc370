"""entropix-vllm: Entropix sampling for vLLM."""

__version__ = "0.1.0"
