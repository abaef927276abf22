"""Layer-wise learning-rate decay (Howard & Ruder 2018, "ULMFiT", sec. 3.2 "discriminative
fine-tuning"; the form of Clark et al. 2020, ELECTRA, appendix A, and Bao et al. 2022, BEiT).

With a backbone of L blocks and a decay factor d, a parameter at depth l trains at lr * d^(L+1-l):

    depth L+1  the task head and every parameter the backbone did not bring (fresh: word-shape
               table, CRF) and the parts above the top block (a pooler, a final norm)  -> lr
    depth l    block l-1 (1-based l = 1..L: the top block is l = L)                  -> lr * d^(L+1-l)
    depth 0    the embeddings (word, position, segment tables and their norm)         -> lr * d^(L+1)

so the top block gets lr*d, the bottom block lr*d^L and the embeddings lr*d^(L+1): the layers
nearest the input, whose features are the most general, move least. The groups carry ``lr_scale``
(the Trainer multiplies its scheduled lr by it) and each depth is split by the one weight-decay rule
(``optim.decays``), so decay and no-decay stay exactly as without layer decay.
"""
from __future__ import annotations

import re

from torch import nn

from .optim import decays, no_weight_decay_names, trainable_parameters

_BLOCK = re.compile(r"(?:blocks|layers|h)\.(\d+)\.")


def _backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) of the network whose blocks are counted: a task model's ``backbone``."""
    inner = getattr(model, "backbone", None)
    return ("backbone.", inner) if isinstance(inner, nn.Module) else ("", model)


def n_blocks(model: nn.Module) -> int:
    _, core = _backbone(model)
    for name in ("blocks", "layers", "h"):
        blocks = getattr(core, name, None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    raise ValueError(f"--layer-decay: {type(core).__name__} has no list of blocks (blocks, layers or h)")


def depth(name: str, n_layers: int, prefix: str = "backbone.") -> int:
    """0 for the embeddings, i + 1 for block i, n_layers + 1 for everything else (see the module docstring)."""
    if not name.startswith(prefix):
        return n_layers + 1
    rest = name[len(prefix):]
    if rest.startswith(("embeddings.", "wte.", "wpe.", "embed", "tok_embeddings.")):
        return 0
    m = _BLOCK.match(rest)
    return int(m.group(1)) + 1 if m else n_layers + 1


def layer_decay_groups(model: nn.Module, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups, one per (depth, decayed or not), with ``lr_scale`` = decay^(L+1-depth)."""
    if not 0 < decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {decay}")
    prefix, _ = _backbone(model)
    n = n_blocks(model)
    listed = no_weight_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for full, p, module in trainable_parameters(model):
        d, wd = depth(full, n, prefix), decays(full, p, module, listed)
        g = groups.setdefault((d, wd), {"params": [], "names": [], "weight_decay": weight_decay if wd else 0.0,
                                        "lr_scale": decay ** (n + 1 - d), "depth": d})
        g["params"].append(p)
        g["names"].append(full)
    if not groups:
        raise ValueError("no trainable parameters (everything is frozen)")
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]
