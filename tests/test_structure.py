"""The shape of the package, checked on its syntax trees (issue 12):

* commands live in ``polymodal/commands/`` and no command module imports another;
* nothing in the library (nn, models, data, tokenizers, train, eval, generate, inference, interop,
  serve, viz) imports ``polymodal.commands`` or the CLI, and nn/models/data/train never import serve;
* there is one training loop: ``loss.backward()`` is called only by ``polymodal/train/trainer.py``;
* no function is longer than 120 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "polymodal"
LIBRARY = ("nn", "models", "data", "tokenizers", "train", "eval", "generate", "inference", "interop", "serve", "viz")
MAX_FUNCTION_LINES = 120


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, tree: ast.AST) -> set[str]:
    """Absolute names of every module the file imports (relative imports resolved)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` may name a module
    return out


def test_commands_do_not_import_each_other():
    bad = []
    for path, tree in _modules():
        name = _module_name(path)
        if not name.startswith("polymodal.commands.") or path.name == "__init__.py":
            continue
        for imp in _imports(path, tree):
            if imp.startswith("polymodal.commands.") and imp != name and (PKG / "commands" / f"{imp.split('.')[2]}.py").exists():
                bad.append(f"{path.relative_to(PKG.parent)} imports {imp}")
    assert not bad, "\n".join(bad)


def test_library_never_imports_commands_or_cli():
    bad = []
    for path, tree in _modules():
        top = path.relative_to(PKG).parts[0]
        if top not in LIBRARY:
            continue
        for imp in _imports(path, tree):
            if imp.startswith(("polymodal.commands", "polymodal.cli")):
                bad.append(f"{path.relative_to(PKG.parent)} imports {imp}")
            if top in ("nn", "models", "data", "train") and imp.startswith("polymodal.serve"):
                bad.append(f"{path.relative_to(PKG.parent)} imports {imp}")
    assert not bad, "\n".join(bad)


def test_no_command_modules_outside_commands():
    stray = sorted(p.name for p in PKG.glob("*_commands.py")) + sorted(
        str(p.relative_to(PKG)) for p in PKG.rglob("commands.py"))
    assert not stray, stray


def test_one_training_loop():
    """Only the Trainer calls ``.backward()`` (every training command hands it a Task)."""
    callers = set()
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward":
                callers.add(str(path.relative_to(PKG.parent)))
    assert callers == {"polymodal/train/trainer.py"}, sorted(callers)


def function_lengths() -> list[tuple[int, str]]:
    rows = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_over_120_lines():
    long = [f"{n} lines: {where}" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


if __name__ == "__main__":  # `python tests/test_structure.py`: the ten longest functions
    for n, where in function_lengths()[:10]:
        print(n, where)
