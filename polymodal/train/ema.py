"""Model averaging: an exponential moving average of the weights (Polyak & Juditsky 1992; the
"EMA" of TensorFlow's ExponentialMovingAverage and timm's ModelEmaV2),

    theta_ema <- beta_t * theta_ema + (1 - beta_t) * theta,   beta_t = min(beta, (1 + t) / (10 + t)),

after every optimizer step t = 0, 1, ...; the warm-up of beta_t (TensorFlow's ``num_updates``)
keeps a short fine-tuning run from averaging in the first, random-head steps with weight ~beta.
The average of the last ~1/(1-beta) iterates sits nearer the centre of the basin the noisy late
iterates bounce around, which is what evaluation and the export read.

The averages live in the model as BUFFERS of an :class:`EMA` submodule (``ema.*``), so a training
checkpoint holds them and an interrupted + resumed run continues the same average bit for bit;
:func:`averaged` swaps them into the parameters for an evaluation and back (exact copies), and
:func:`export_copy` builds the plain model a user loads (averaged weights, no ``ema.*``).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def _key(name: str) -> str:
    return name.replace(".", "__")


class EMA(nn.Module):
    """Float32 averages of a model's trainable parameters, and the update count."""

    def __init__(self, model: nn.Module, beta: float):
        super().__init__()
        if not 0 < beta < 1:
            raise ValueError(f"--ema must be in (0, 1) (0 = off), got {beta}")
        self.beta = beta
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(_key(n), p.detach().float().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.float64))

    def pairs(self, model: nn.Module):
        params = dict(model.named_parameters())
        for n in self.names:
            yield params[n], getattr(self, _key(n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        t = float(self.updates)
        beta = min(self.beta, (1 + t) / (10 + t))
        for p, avg in self.pairs(model):
            avg.mul_(beta).add_(p.detach().float(), alpha=1 - beta)
        self.updates += 1


def attach(model: nn.Module, beta: float) -> nn.Module:
    """Adds ``model.ema`` (starting at the current weights) and returns the model."""
    model.ema = EMA(model, beta)
    return model


def find(model: nn.Module) -> EMA | None:
    ema = getattr(model, "ema", None)
    return ema if isinstance(ema, EMA) else None


@contextlib.contextmanager
def averaged(model: nn.Module):
    """The block runs with the averaged weights in the parameters; the trained ones come back after."""
    ema = find(model)
    if ema is None:
        yield model
        return
    saved = []
    with torch.no_grad():
        for p, avg in ema.pairs(model):
            saved.append(p.detach().clone())
            p.copy_(avg)
    try:
        yield model
    finally:
        with torch.no_grad():
            for (p, _), old in zip(ema.pairs(model), saved):
                p.copy_(old)


def export_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` holding the averaged weights and no EMA buffers (the model a user loads)."""
    ema = find(model)
    if ema is None:
        return model
    with averaged(model):
        out = copy.deepcopy(model)
    del out.ema
    return out
