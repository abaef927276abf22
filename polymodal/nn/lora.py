"""LoRA: low-rank adaptation (Hu et al., 2021, eq. 3).

A frozen weight W0 is adapted by a trainable low-rank update:
    h = W0 x + (alpha / r) * B A x,   A in R^{r x k}, B in R^{d x r}
B starts at zero, so training begins exactly at the pretrained function.
``merge()`` folds the update into W0 (no inference overhead); ``unmerge()``
takes it out again.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               freeze_rest: bool = True) -> list[str]:
    """Wraps every nn.Linear whose qualified name matches a glob in ``targets``
    (e.g. ``["*.attn.qkv", "*.attn.proj"]``) and freezes everything else.
    Returns the wrapped names; raises if nothing matched (a typo should not
    silently train nothing)."""
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(fnmatch.fnmatch(full, t) for t in targets):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"LoRA targets {targets} matched no nn.Linear in {type(model).__name__}")
    return wrapped


def merge_lora(model: nn.Module, unwrap: bool = True) -> nn.Module:
    """Merges every adapter into its base weight; with ``unwrap`` replaces the
    LoRALinear by its plain nn.Linear so the model exports like the original."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                if unwrap:
                    child.base.weight.requires_grad_(True)
                    setattr(module, child_name, child.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}
