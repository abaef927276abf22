"""Attention masks as boolean tensors (True = may attend), shape (B|1, 1, T, S).

* causal: key slot j <= query slot i (a language model may not look ahead);
* local: causal and i - j < window: GPT-3's "locally banded sparse" layers
  (Brown et al., 2020, sec. 2.1, after Child et al., 2019);
* bidirectional: every real key (BERT, ViT, encoders);
* cross: every real key of the other sequence (decoder -> encoder memory).

Padding keys are never attended to. A query always sees its own slot, so a
padding query's row is never empty (an all-masked row would make softmax NaN).
"""
from __future__ import annotations

import torch

MASK_KINDS = ("causal", "local", "bidirectional", "cross")


def build_mask(
    kind: str,
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor | None:
    """q_slots (T,), k_slots (S,) are positions in a common index (cache slots).

    Returns None when nothing needs masking (bidirectional, no padding).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    qi, kj = q_slots[:, None], k_slots[None, :]
    if kind == "causal":
        m = kj <= qi
    elif kind == "local":
        if not window or window < 1:
            raise ValueError("a local (banded) mask needs window >= 1")
        m = (kj <= qi) & (kj > qi - window)
    else:
        m = None
    if key_valid is not None:
        kv = key_valid[:, None, None, :].to(torch.bool)
        if m is None:
            if kind == "bidirectional" or kind == "cross":
                return kv
        m = m[None, None] & kv
        if kind in ("causal", "local"):
            m = m | (kj == qi)[None, None]
        return m
    return None if m is None else m[None, None]


def to_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean mask -> additive bias (0 where allowed, the dtype's min elsewhere)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
