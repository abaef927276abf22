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


_POSITION_NAMES = ("pos_embed", "position", "wpe", "cls_token", "dist_token", "register_tokens", "logit_scale",
                   "temperature", "relative_attention_bias", "rel_bias")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names listed by ``no_weight_decay()`` anywhere in the model (timm's convention: a module
    returns names relative to itself; a submodule's are prefixed with its path)."""
    out: set[str] = set()
    for mname, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                out.add(f"{mname}.{n}" if mname else n)
    return out


def decays(full_name: str, p: torch.Tensor, module: nn.Module, listed: set[str]) -> bool:
    """The one weight-decay rule: decay the weight matrices of linear and conv layers; never
    biases, norm gains, embedding tables, positions (learned tables, class tokens, scales and
    relative biases), any 1-D parameter, or what the model lists in ``no_weight_decay()``."""
    pname = full_name.rsplit(".", 1)[-1]
    if p.ndim < 2 or pname.endswith("bias") or _is_norm(module) or full_name in listed:
        return False
    if isinstance(module, nn.Embedding) or "pos" in type(module).__name__.lower():
        return False
    return not any(k in part for part in full_name.split(".") for k in _POSITION_NAMES)


def trainable_parameters(model: nn.Module):
    """(full name, parameter, owning module) of every trainable parameter, each once (a tied
    parameter under its first owner, so lm_head tied to wte counts as the embedding)."""
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p, module


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group and a non-decayed one (:func:`decays`).

    Tied parameters (lm_head tied to wte) appear once, classified by their first owner
    (the embedding), so the tied matrix is not decayed. Frozen parameters are left out.
    """
    listed = no_weight_decay_names(model)
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for full, p, module in trainable_parameters(model):
        if decays(full, p, module, listed):
            decay.append(p)
            decay_names.append(full)
        else:
            no_decay.append(p)
            no_decay_names.append(full)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
    return [g for g in groups if g["params"]] or groups[:1]


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
               eps: float = 1e-8, fused: bool | None = None, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused (one kernel for all tensors) or foreach
    (multi-tensor) implementation where the device supports it, since the per-parameter
    python loop dominates the optimizer step of small models."""
    groups = groups if groups is not None else param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters (everything is frozen)")
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
