"""``polymodal list``: the models you can name (aliases, runs), presets, the GGUF cache, tasks."""
from __future__ import annotations

import json as jsonlib


def list_cmd(json: bool = False) -> dict:
    """List the installed models (aliases like smollm2 and minilm), runs under runs/, presets, the GGUF cache and the tasks.

    Args:
        json: print one JSON object instead of text
    """
    from ..interop.aliases import catalog

    c = catalog()
    if json:
        print(jsonlib.dumps(c))
        return c
    print("models (--model NAME, polymodal.load(NAME)):")
    for m in c["models"]:
        print(f"  {m['name']:<10} {m['description']}" + (f"\n  {'':<10} {m['path']}" if m["installed"]
                                                           else f"  [not installed: {m['install']}]"))
    print("runs:" if c["runs"] else "runs: none (train one: `polymodal quickstart`)")
    for r in c["runs"]:
        print(f"  {r['name']:<20} {r['model']}")
    print("presets (model configs to train from scratch):")
    for family, names in c["presets"].items():
        print(f"  {family:<10} {', '.join(names)}")
    mib = sum(e["bytes"] for e in c["cache"]) / 2**20
    print(f"GGUF cache: {len(c['cache'])} entries, {mib:.0f} MiB (`polymodal cache`)")
    print("tasks:")
    for kind, names in c["tasks"].items():
        print(f"  {kind:<10} {', '.join(names) or '-'}")
    return c
