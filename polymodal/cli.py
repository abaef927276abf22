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
from typing import Any, Callable, Literal, get_args, get_origin

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("polymodal.train.quickstart", "quickstart"),
    "prepare": ("polymodal.data.prepare", "prepare"),
    "train": ("polymodal.train.commands", "train"),
    "generate": ("polymodal.generate.commands", "generate_cmd"),
    "ngram": ("polymodal.models.ngram", "ngram_cmd"),
    "convert": ("polymodal.interop.commands", "convert_cmd"),
    "chat": ("polymodal.chat", "chat_cmd"),
    "train-seq2seq": ("polymodal.seq2seq_commands", "train_seq2seq"),
    "translate": ("polymodal.seq2seq_commands", "translate"),
    "summarize": ("polymodal.seq2seq_commands", "summarize"),
    "train-clip": ("polymodal.vision_commands", "train_clip"),
    "zero-shot": ("polymodal.vision_commands", "zero_shot"),
    "retrieve": ("polymodal.vision_commands", "retrieve"),
    "eval-retrieval": ("polymodal.vision_commands", "eval_retrieval"),
    "train-vit": ("polymodal.vit_commands", "train_vit"),
    "linear-probe": ("polymodal.vit_commands", "linear_probe"),
    "train-vqa": ("polymodal.vqa_commands", "train_vqa"),
    "vqa": ("polymodal.vqa_commands", "vqa"),
    "eval-vqa": ("polymodal.vqa_commands", "eval_vqa"),
    "finetune": ("polymodal.train.finetune", "finetune"),
    "eval": ("polymodal.train.finetune", "eval_cmd"),
    "pretrain-mlm": ("polymodal.train.pretrain_mlm", "pretrain_mlm"),
    "serve": ("polymodal.serve.commands", "serve_cmd"),
    "score-text": ("polymodal.eval.text_metrics", "score_text_cmd"),
    "fewshot": ("polymodal.eval.fewshot", "fewshot_cmd"),
    "train-vlm": ("polymodal.vlm_commands", "train_vlm"),
    "caption": ("polymodal.vlm_commands", "caption"),
    "eval-caption": ("polymodal.vlm_commands", "eval_caption"),
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
    return parser


def run_command(name: str, argv: list[str]) -> Any:
    if name not in COMMANDS:
        raise SystemExit(f"polymodal: unknown command {name!r}; run 'polymodal --help' for the list")
    module, attr = COMMANDS[name]
    fn = getattr(importlib.import_module(module), attr)
    args = build_parser(name, fn).parse_args(argv)
    return fn(**vars(args))


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
