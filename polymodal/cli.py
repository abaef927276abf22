"""``polymodal <command>``: a CLI generated from typed function signatures.

Each command is a plain Python function with annotated parameters and a
docstring; its parameters become ``--flags`` (underscores -> dashes) with the
annotation as the type and the default as the default. Commands are imported
lazily, so ``polymodal --help`` stays fast and one command's optional
dependencies never break another.

Register a command by adding one line to ``COMMANDS``: name -> (module, function).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("polymodal.commands.quickstart", "quickstart"),
    "prepare": ("polymodal.commands.prepare", "prepare"),
    "train": ("polymodal.commands.train", "train"),
    "generate": ("polymodal.commands.generate", "generate_cmd"),
    "chat": ("polymodal.commands.chat", "chat_cmd"),
    "ngram": ("polymodal.commands.ngram", "ngram_cmd"),
    "convert": ("polymodal.commands.convert", "convert_cmd"),
    "finetune": ("polymodal.commands.finetune", "finetune"),
    "eval": ("polymodal.commands.finetune", "eval_cmd"),
    "pretrain-mlm": ("polymodal.commands.pretrain_mlm", "pretrain_mlm"),
    "fewshot": ("polymodal.commands.fewshot", "fewshot_cmd"),
    "train-seq2seq": ("polymodal.commands.seq2seq", "train_seq2seq"),
    "translate": ("polymodal.commands.seq2seq", "translate"),
    "summarize": ("polymodal.commands.seq2seq", "summarize"),
    "score-text": ("polymodal.commands.score_text", "score_text_cmd"),
    "train-vit": ("polymodal.commands.vit", "train_vit"),
    "linear-probe": ("polymodal.commands.vit", "linear_probe"),
    "train-clip": ("polymodal.commands.clip", "train_clip"),
    "zero-shot": ("polymodal.commands.clip", "zero_shot"),
    "retrieve": ("polymodal.commands.clip", "retrieve"),
    "eval-retrieval": ("polymodal.commands.clip", "eval_retrieval"),
    "train-vqa": ("polymodal.commands.vqa", "train_vqa"),
    "vqa": ("polymodal.commands.vqa", "vqa"),
    "eval-vqa": ("polymodal.commands.vqa", "eval_vqa"),
    "train-vlm": ("polymodal.commands.vlm", "train_vlm"),
    "caption": ("polymodal.commands.vlm", "caption"),
    "eval-caption": ("polymodal.commands.vlm", "eval_caption"),
    "serve": ("polymodal.commands.serve", "serve_cmd"),
    "list": ("polymodal.commands.list", "list_cmd"),
    "cache": ("polymodal.commands.cache", "cache_cmd"),
    "classify": ("polymodal.commands.classify", "classify_cmd"),
}


def _first_line(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").split("\n", 1)[0]


def _param_help(fn: Callable) -> dict[str, str]:
    """Reads ``name: help`` lines from an ``Args:`` section of the docstring."""
    doc = inspect.getdoc(fn) or ""
    out, in_args = {}, False
    for line in doc.splitlines():
        s = line.strip()
        if s.lower().startswith("args:"):
            in_args = True
            continue
        if in_args and ":" in s and not s.startswith("-"):
            name, text = s.split(":", 1)
            if name.isidentifier():
                out[name] = text.strip()
    return out


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


class _ListFlag(argparse.Action):
    """A list flag that takes several values and may be repeated: ``--x a b --x c`` -> [a, b, c].

    The first use replaces the default (argparse's own "extend" would append to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, items + list(values))


def build_parser(name: str, fn: Callable) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"polymodal {name}", description=inspect.getdoc(fn),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(fn)
    helps = _param_help(fn)
    for p in inspect.signature(fn).parameters.values():
        tp = _unwrap_optional(hints.get(p.name, str))
        flag = "--" + p.name.replace("_", "-")
        kw: dict[str, Any] = {"help": helps.get(p.name, ""), "dest": p.name}
        required = p.default is inspect.Parameter.empty
        if not required:
            kw["default"] = p.default
            kw["help"] += f" (default: {p.default})"
        if tp is bool:
            kw.pop("help")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default if not required else False,
                                help=helps.get(p.name, "") + f" (default: {p.default})", dest=p.name)
            continue
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            kw["nargs"] = "+"
            kw["action"] = _ListFlag
            inner = get_args(tp)[0] if get_args(tp) else str
            kw["type"] = inner
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        parser.add_argument(flag, required=required, **kw)
    if "resume" in inspect.signature(fn).parameters:  # a training command: recipes as YAML
        parser.add_argument("--config", metavar="FILE.yaml",
                            help="read flags from a YAML mapping (flags given on the command line win)")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved flags as YAML and exit (save it as a --config file)")
    return parser


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--config FILE.yaml``: a mapping whose keys are the command's flags (dashes or underscores)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{p}:{line + 1}" if line is not None else str(p)
        raise ValueError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a config must be a mapping of flag names to values")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "print_config")}
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise ValueError(f"{p}: unknown key {k!r}; the flags of this command are "
                             f"{', '.join(sorted(n.replace('_', '-') for n in known))}")
        act = known[key]
        if act.type is not None and v is not None and not isinstance(v, (list, bool)):
            try:
                v = act.type(v)
            except (TypeError, ValueError):
                raise ValueError(f"{p}: key {k!r} must be {getattr(act.type, '__name__', act.type)}, got {v!r}") from None
        if act.choices is not None and v not in act.choices:
            raise ValueError(f"{p}: key {k!r} must be one of {list(act.choices)}, got {v!r}")
        out[key] = v
    return out


def _resume_defaults(argv: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """With ``--resume``, the run's own flags (``<out>/config.json`` "flags") are the defaults, so a
    bare ``--resume --out RUN`` continues the same recipe; flags given again still win."""
    import json

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if not known.resume:
        return {}
    out = known.out or next((a.default for a in parser._actions if a.dest == "out"), None)
    cfg = Path(out) / "config.json" if out else None
    if cfg is None or not cfg.is_file():
        return {}
    try:
        flags = json.loads(cfg.read_text()).get("flags") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{cfg}: not valid JSON (the run's recipe)") from None
    dests = {a.dest for a in parser._actions}
    return {k: v for k, v in flags.items() if k in dests and k not in ("resume", "overwrite")}


def run_command(name: str, argv: list[str]) -> Any:
    if name not in COMMANDS:
        raise SystemExit(f"polymodal: unknown command {name!r}; run 'polymodal --help' for the list")
    module, attr = COMMANDS[name]
    fn = getattr(importlib.import_module(module), attr)
    parser = build_parser(name, fn)
    trains = "resume" in inspect.signature(fn).parameters
    if trains:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        cfg_path = pre.parse_known_args(argv)[0].config
        defaults = _resume_defaults(argv, parser)
        if cfg_path:
            defaults.update(_load_config(cfg_path, parser))
        if defaults:
            parser.set_defaults(**defaults)
            for a in parser._actions:  # a flag the config supplies is no longer required
                if a.dest in defaults:
                    a.required = False
    args = vars(parser.parse_args(argv))
    if trains:
        args.pop("config", None)
        if args.pop("print_config", False):
            import yaml

            print(yaml.safe_dump({k.replace("_", "-"): v for k, v in args.items()}, sort_keys=False), end="")
            return None
    return fn(**args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: polymodal <command> [--help] [options]\n\ncommands:")
        for name, (module, attr) in COMMANDS.items():
            try:
                doc = _first_line(getattr(importlib.import_module(module), attr))
            except Exception as e:  # a command whose module fails to import is still listed
                doc = f"(unavailable: {e})"
            print(f"  {name:<14} {doc}")
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(__version__)
        return 0
    try:
        run_command(argv[0], argv[1:])
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .io import CheckpointError
        if isinstance(e, (ValueError, FileNotFoundError, CheckpointError)):
            print(f"polymodal {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
