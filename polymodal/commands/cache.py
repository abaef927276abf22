"""``polymodal cache``: the GGUF conversion cache (list it, prune it, clear it)."""
from __future__ import annotations

import json as jsonlib


def cache_cmd(clear: bool = False, prune: bool = False, json: bool = False) -> list[dict]:
    """List the GGUF cache (dequantised copies of the .gguf files loaded so far), or clear it.

    Args:
        clear: remove every cache entry (they are rebuilt on the next load)
        prune: remove only the entries no existing .gguf file maps to (older conversions, deleted or changed files)
        json: print one JSON object instead of a table
    """
    from ..interop.gguf import cache_entries, cache_root, clear_cache

    if clear and prune:
        raise ValueError("--clear removes everything, --prune only unused entries: give one of them")
    entries = clear_cache(unused_only=prune) if clear or prune else cache_entries()
    action = "removed" if clear or prune else "entries"
    if json:
        print(jsonlib.dumps({"cache": str(cache_root()), action: entries,
                             "bytes": sum(e["bytes"] for e in entries)}))
        return entries
    total = sum(e["bytes"] for e in entries) / 2**20
    print(f"{cache_root()}: {len(entries)} {action}, {total:.0f} MiB")
    for e in entries:
        src = ", ".join(e["sources"]) or "(no existing .gguf maps to it: `polymodal cache --prune` removes it)"
        print(f"  {e['name']}  {e['bytes'] / 2**20:8.1f} MiB  {src}")
    return entries
