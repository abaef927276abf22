"""AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization", Algorithm 2)
with the GPT-2/3 convention of two parameter groups.

AdamW applies the decay directly to the weights, theta <- theta - lr * (m_hat / (sqrt(v_hat) + eps)
+ lambda * theta), rather than adding lambda * theta to the gradient (which Adam's
per-coordinate scaling would distort). Decay is a prior that pulls *matrices* towards
zero; biases, normalisation gains and embedding tables are excluded (as in GPT-3 and
nanoGPT): shrinking a LayerNorm gain or a bias towards 0 has no regularising meaning,
and decaying embeddings penalises rare tokens, whose rows receive few gradient updates.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group (weight matrices of Linear/conv layers)
    and a non-decayed one (biases, norm gains, embeddings, every 1-D parameter).

    Tied parameters (lm_head tied to wte) appear once, classified by their first owner
    (the embedding), so the tied matrix is not decayed.
    """
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            embedding = isinstance(module, nn.Embedding) or "pos" in type(module).__name__.lower()
            if p.ndim < 2 or pname.endswith("bias") or _is_norm(module) or embedding:
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
               eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused (one kernel for all tensors) or foreach
    (multi-tensor) implementation where the device supports it, since the per-parameter
    python loop dominates the optimizer step of small models."""
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device
    kw: dict = {}
    sig = inspect.signature(torch.optim.AdamW).parameters
    if fused is None:
        # fused AdamW exists for CUDA (and CPU since torch 2.4); it is bitwise-different from the
        # foreach path but deterministic, which is all exact resume needs.
        fused = "fused" in sig and device.type in ("cuda", "cpu")
    if fused and "fused" in sig:
        kw["fused"] = True
    elif "foreach" in sig:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)
