"""Weight initialisation shared by the model families.

GPT-2 / BERT / T5 (and Hugging Face's ``_init_weights``) all start from
W ~ N(0, std^2) with std = ``initializer_range`` (0.02) and zero biases; each family
then adds its own twist (GPT-2's 1/sqrt(2L) residual scaling, T5's std-1 embedding).
"""
from __future__ import annotations

from torch import nn


def normal_init_(module: nn.Module, std: float, embeddings: bool = True) -> None:
    """N(0, std^2) weights and zero biases for every nn.Linear (and nn.Embedding) in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif embeddings and isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
