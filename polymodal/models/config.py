"""Config plumbing shared by every model family.

Each family has one dataclass Config plus named presets (litgpt style). A
config holds only plain values (class *names*, not classes), so it
round-trips through config.json.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar


@dataclasses.dataclass
class ConfigBase:
    family: ClassVar[str] = "base"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d.pop("family", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
        for f in dataclasses.fields(cls):  # JSON turns tuples into lists
            if f.name in d and isinstance(d[f.name], list):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.family} preset {name!r}; choose from {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], "name": name, **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
