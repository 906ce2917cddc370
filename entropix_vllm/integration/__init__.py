"""vLLM adapters: the only package that imports vllm (imported lazily by its modules)."""
