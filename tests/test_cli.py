"""The CLI is generated from typed signatures: flags, types, defaults and choices."""
from typing import Literal

import pytest

from polymodal import cli


def _cmd(name: str, steps: int = 3, lr: float = 0.1, mode: Literal["a", "b"] = "a", fast: bool = False,
         tags: list[str] | None = None, out: str | None = None):
    """Example command.

    Args:
        name: the name
        steps: how many steps
    """
    return dict(name=name, steps=steps, lr=lr, mode=mode, fast=fast, tags=tags, out=out)


def test_parser_types_defaults_and_choices():
    p = cli.build_parser("x", _cmd)
    a = vars(p.parse_args(["--name", "n", "--steps", "7", "--lr", "0.5", "--mode", "b", "--fast", "--tags", "u", "v"]))
    assert a == dict(name="n", steps=7, lr=0.5, mode="b", fast=True, tags=["u", "v"], out=None)
    d = vars(p.parse_args(["--name", "n"]))
    assert d["steps"] == 3 and d["fast"] is False and d["mode"] == "a"
    assert "how many steps" in p.format_help()


@pytest.mark.parametrize("argv", [["--steps", "2"], ["--name", "n", "--mode", "c"], ["--name", "n", "--steps", "x"]])
def test_parser_rejects_bad_input(argv):
    with pytest.raises(SystemExit):
        cli.build_parser("x", _cmd).parse_args(argv)


def test_unknown_command_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match="unknown command"):
        cli.main(["no-such-command"])


def test_every_registered_command_builds_a_parser():
    import importlib

    for name, (module, attr) in cli.COMMANDS.items():
        fn = getattr(importlib.import_module(module), attr)
        cli.build_parser(name, fn).format_help()
