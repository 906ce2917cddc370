"""A tiny random Llama model (weights + tokenizer) built in-process, for tests.

Nothing is downloaded: the tokenizer is a word-level tokenizer over made-up
words, built with the ``tokenizers`` library and wrapped in
``PreTrainedTokenizerFast``; the weights are random with a fixed seed.

The defaults (4 query heads, 2 KV heads) divide by 2 so the model runs under
tensor parallelism 2. The query and key projections are drawn with a larger
spread than the usual initialisation so that the attention rows are peaked
(near-uniform attention would make the attention figures a weak test).

Use :func:`make_tiny_llama` (returns the folder) or run
``python tests/tiny_model.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(vocab_size - len(SPECIALS)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(path: str, num_layers: int = 3, hidden_size: int = 128,
                    num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 1024,
                    intermediate_size: int = 256, max_position_embeddings: int = 1024,
                    qk_std: float = 0.1, seed: int = 0, overwrite: bool = False) -> str:
    """Write a random float32 Llama model and its tokenizer to ``path``.

    head_dim = hidden_size // num_heads must be one vLLM's CPU attention
    supports (32, 64, 80, 96, 112, 128, ...; not 16).

    Returns ``path``. An existing model with the same settings is reused
    unless ``overwrite`` is set.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, vocab_size=vocab_size,
                    intermediate_size=intermediate_size,
                    max_position_embeddings=max_position_embeddings, qk_std=qk_std, seed=seed)
    stamp = os.path.join(path, "tiny_model_settings.json")
    if not overwrite and os.path.exists(stamp) and os.path.exists(os.path.join(path, "config.json")):
        with open(stamp) as f:
            if json.load(f) == settings:
                return path

    os.makedirs(path, exist_ok=True)
    tok = _build_tokenizer(vocab_size)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.05,
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * qk_std)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return path


def tiny_prompt(length: int, seed: int, vocab_size: int = 1024) -> list:
    """A reproducible list of ``length`` ordinary token ids (no special tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randint(len(SPECIALS), vocab_size, (length,), generator=g)).tolist()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "models/tiny-llama"
    print(make_tiny_llama(out, overwrite=True))
