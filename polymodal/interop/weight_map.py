"""Declarative, two-way weight maps between Hugging Face and polymodal names.

A map is a list of rules. ``{}`` in a name stands for the layer index. Each
rule names the Hugging Face tensor(s), our tensor(s) and an explicit transform
with its inverse, so the same table imports and exports:

    copy("transformer.h.{}.ln_1.weight", "blocks.{}.norm1.weight")
    transpose("transformer.h.{}.attn.c_attn.weight", "blocks.{}.attn.qkv.weight")  # GPT-2 Conv1D is (in, out)
    fuse(["model.layers.{}.self_attn.q_proj.weight", "...k_proj...", "...v_proj..."],
         "blocks.{}.attn.qkv.weight", sizes=[q, kv, kv])                           # cat on import, split on export

Conversion errors name the source file and the tensor.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Callable, Mapping, Sequence

import torch

from ..io import CheckpointError

Fn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclasses.dataclass
class Rule:
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Fn
    to_hf: Fn
    optional: bool = False  # e.g. a bias that only some configs have

    def expand(self, n_layers: int) -> list["Rule"]:
        if not any("{}" in n for n in self.hf + self.ours):
            return [self]
        return [dataclasses.replace(self, hf=tuple(n.replace("{}", str(i)) for n in self.hf),
                                    ours=tuple(n.replace("{}", str(i)) for n in self.ours)) for i in range(n_layers)]


def copy(hf: str, ours: str, optional: bool = False) -> Rule:
    return Rule((hf,), (ours,), lambda t: t, lambda t: t, optional)


def transpose(hf: str, ours: str, optional: bool = False) -> Rule:
    """Hugging Face GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in)."""
    f = lambda t: [t[0].t().contiguous()]  # noqa: E731
    return Rule((hf,), (ours,), f, f, optional)


def fuse(hf: Sequence[str], ours: str, sizes: Sequence[int], dim: int = 0, optional: bool = False) -> Rule:
    """Several HF tensors concatenated along ``dim`` into one of ours (fused QKV,
    SwiGLU gate+up); export splits it back with the ``sizes`` from the config."""
    return Rule(tuple(hf), (ours,), lambda ts: [torch.cat(ts, dim=dim)],
                lambda ts: list(torch.split(ts[0], list(sizes), dim=dim)), optional)


def custom(hf: Sequence[str], ours: Sequence[str], to_ours: Fn, to_hf: Fn, optional: bool = False) -> Rule:
    return Rule(tuple(hf), tuple(ours), to_ours, to_hf, optional)


class WeightMap:
    def __init__(self, rules: Sequence[Rule], n_layers: int, ignore_hf: Sequence[str] = (),
                 ignore_ours: Sequence[str] = ()):
        self.rules = [r for rule in rules for r in rule.expand(n_layers)]
        self.ignore_hf = list(ignore_hf)  # globs of HF tensors that carry nothing (buffers, position ids)
        self.ignore_ours = list(ignore_ours)

    @staticmethod
    def _ignored(name: str, globs: list[str]) -> bool:
        return any(fnmatch.fnmatch(name, g) for g in globs)

    def to_ours(self, hf_sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        missing: list[str] = []
        for r in self.rules:
            present = [k in hf_sd for k in r.hf]
            if not all(present):
                if not r.optional or any(present):
                    missing += [k for k, p in zip(r.hf, present) if not p]
                continue
            try:
                tensors = r.to_ours([hf_sd[k] for k in r.hf])
            except RuntimeError as e:
                raise CheckpointError(f"{source}: cannot convert tensor(s) {list(r.hf)}: {e}") from None
            out.update(zip(r.ours, tensors))
            used.update(r.hf)
        if missing:
            raise CheckpointError(f"{source}: missing tensor(s) {_short(missing)}")
        unexpected = [k for k in hf_sd if k not in used and not self._ignored(k, self.ignore_hf)]
        if unexpected:
            raise CheckpointError(f"{source}: unexpected tensor(s) {_short(unexpected)}")
        return out

    def to_hf(self, our_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for r in self.rules:
            if not all(k in our_sd for k in r.ours):
                if r.optional:
                    continue
                raise CheckpointError(f"export: our tensor(s) {[k for k in r.ours if k not in our_sd]} missing")
            out.update(zip(r.hf, r.to_hf([our_sd[k] for k in r.ours])))
            used.update(r.ours)
        left = [k for k in our_sd if k not in used and not self._ignored(k, self.ignore_ours)]
        if left:
            raise CheckpointError(f"export: no Hugging Face name for tensor(s) {_short(left)}")
        return out


def _short(names: list[str], n: int = 8) -> str:
    s = ", ".join(repr(x) for x in names[:n])
    return s + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


def load_into(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "<state dict>",
              assign: bool = False) -> None:
    """Strictly loads ``sd`` into ``model``; errors name the source and the tensor.

    Tied weights (one Parameter under two names) need only one of their names."""
    own = model.state_dict()
    tied = _tied_aliases(model)
    missing = [k for k in own if k not in sd and not (k in tied and tied[k] in sd)]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_short(unexpected)}")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    full = {k: sd.get(k, sd.get(tied.get(k, ""))) for k in own}
    model.load_state_dict(full, strict=True, assign=assign)
    if assign and hasattr(model, "tie_weights"):  # assign replaces Parameters, which unties shared ones
        model.tie_weights()


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """name -> the first name sharing its storage (e.g. lm_head.weight -> wte.weight)."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            alias[name] = first[key]
            alias[first[key]] = name
        else:
            first[key] = name
    return alias


_LAYER = re.compile(r"\.(\d+)\.")


def layer_count(keys, prefix: str) -> int:
    """Number of layers in a state dict, from keys like ``{prefix}.{i}.``."""
    idx = [int(m.group(1)) for k in keys if k.startswith(prefix) for m in [_LAYER.search(k[len(prefix) - 1:])] if m]
    return max(idx) + 1 if idx else 0
