"""The README's commands stay true: it opens with the two set-up commands, and every
`polymodal ...` line in it names a real command whose flags parse with the generated
CLI. (The Python example's SmolLM2 "Paris" answer is checked in test_smollm2.py.)"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

from polymodal import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines():
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:\.venv/bin/)?polymodal(?:\.cli)? (\S.*)$", line)
            if m and not line.startswith("make"):
                lines.append(m.group(1))
    return lines


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert cmds == ["make quickstart", "make test"]


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_parses(line):
    argv = [a for a in shlex.split(line) if a != "..."]
    name, args = argv[0], argv[1:]
    assert name in cli.COMMANDS, f"README uses unknown command {name!r}"
    module, attr = cli.COMMANDS[name]
    parser = cli.build_parser(name, getattr(importlib.import_module(module), attr))
    parser.parse_args(args)  # exits (fails the test) on an unknown flag or a bad value


def test_readme_lists_commands():
    assert len(_command_lines()) >= 8
