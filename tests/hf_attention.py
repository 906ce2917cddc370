"""Independent reference for the attention figures: HF transformers, eager attention.

Runs the HF model (float32, eager attention) on a token sequence and records,
for one decoder layer, the softmax probabilities that HF's own eager attention
computes (``attn_weights``) and the pre-softmax scores ``scaling * q . k``
from the query and key it hands to the attention function (after rotary
embedding, before the GQA repeat). The four figures of SPEC section 2 are then
computed here from those tensors in float64, without entropix code.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

_PROBE = "entropix_probe_eager"
_CAPTURED: Dict[int, dict] = {}


def _probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    out, weights = eager_attention_forward(module, query, key, value, attention_mask,
                                           scaling=scaling, dropout=dropout, **kwargs)
    _CAPTURED[module.layer_idx] = {"q": query.detach(), "k": key.detach(),
                                   "p": weights.detach(), "scaling": float(scaling)}
    return out, weights


def load_hf(path: str):
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(_PROBE, _probe)
    # A registered attention function needs its mask kind too (else no causal mask).
    AttentionMaskInterface.register(_PROBE, eager_mask)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=_PROBE)
    model.eval()
    return model


@torch.no_grad()
def figures_at(model, token_ids: Sequence[int], layer: int, lengths: Sequence[int]) -> List[List[float]]:
    """Figures [attn_entropy, attn_varentropy, agreement, interaction_strength]
    of the query at position ``L - 1`` over keys ``0..L-1``, for each ``L`` in
    ``lengths``, from one causal forward pass over ``token_ids``."""
    _CAPTURED.clear()
    model(torch.tensor([list(token_ids)]), use_cache=False)
    n_layers = model.config.num_hidden_layers
    c = _CAPTURED[layer % n_layers]
    q, k, p_all, scaling = c["q"][0].double(), c["k"][0].double(), c["p"][0].double(), c["scaling"]
    H, Hkv = q.shape[0], k.shape[0]
    k_per_q = k[torch.arange(H) // (H // Hkv)]  # [H, T, D]
    out = []
    for L in lengths:
        s = scaling * torch.einsum("hd,hld->hl", q[:, L - 1], k_per_q[:, :L])  # [H, L]
        p = p_all[:, L - 1, :L]  # HF eager softmax, float32 -> float64
        # HF's own probabilities must be the softmax of these scores.
        assert torch.allclose(p, torch.softmax(s, -1), rtol=1e-4, atol=1e-6)
        assert (p_all[:, L - 1, L:] == 0).all()  # causal
        plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
        e_h = -plogp.sum(-1) / math.log(2.0)
        ae = e_h.mean()
        av = ((e_h - ae) ** 2).mean()
        agr = (p - p.mean(0, keepdim=True)).abs().mean()
        inter = s.abs().mean()
        out.append([ae.item(), av.item(), agr.item(), inter.item()])
    return out
