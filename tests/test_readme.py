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
    if "--config" in args:  # the flags come from the file, as run_command reads them
        cfg = cli._load_config(str(README.parent / args[args.index("--config") + 1]), parser)
        parser.set_defaults(**cfg)
        for a in parser._actions:
            if a.dest in cfg:
                a.required = False
    parser.parse_args(args)  # exits (fails the test) on an unknown flag or a bad value


def test_readme_lists_commands():
    assert len(_command_lines()) >= 8


# -- the README's quick commands run, in order, in a sandbox laid out like the repository -------
# Commands that finish in seconds are run for real; the others (training runs of minutes, the
# server) are only parsed above. A line whose --model/--src names something that the lines before
# it did not create (runs/quickstart...) is skipped: it depends on a long run.
RUN_IN_SECONDS = {"prepare", "train", "generate", "convert", "score-text", "chat", "ngram", "list", "cache"}
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _sandbox(tmp: Path) -> Path:
    import os
    import shutil

    main = tmp / "main"
    main.mkdir()
    if SHARED.is_dir():
        os.symlink(SHARED, tmp / "shared")
    shutil.copytree(README.parent / "configs", main / "configs")
    corpus = (SHARED / "data" / "tiny_shakespeare" / "train.txt").read_text()[:60_000] if SHARED.is_dir() else "to be or not to be\n" * 2000
    (main / "my_corpus.txt").write_text(corpus)
    (main / "hyp.de").write_text("ein Hund läuft\nzwei Männer\n")
    (main / "ref.de").write_text("ein Hund rennt\nzwei Männer stehen\n")
    try:
        from polymodal.interop import default_model_path

        os.symlink(default_model_path(), main / "model.gguf")
    except FileNotFoundError:
        pass
    return main


def _depends_on_missing(args: list[str], cwd: Path) -> bool:
    for flag in ("--model", "--src"):
        if flag in args:
            p = args[args.index(flag) + 1]
            if not (cwd / p).exists() and not Path(p).is_absolute():
                return True
    return False


@pytest.mark.slow
def test_readme_quick_commands_run(tmp_path):
    import os
    import subprocess
    import sys

    cwd = _sandbox(tmp_path)
    ran, skipped = [], []
    for line in _command_lines():
        argv = [a for a in shlex.split(line) if a != "..."]
        if argv[0] not in RUN_IN_SECONDS or "..." in line or _depends_on_missing(argv[1:], cwd):
            skipped.append(line)
            continue
        if argv[0] == "generate":
            argv += ["--max-new-tokens", "8"]
        if argv[0] == "train":
            argv += ["--max-steps", "4" if "--resume" not in argv else "6"]
        r = subprocess.run([sys.executable, "-m", "polymodal.cli", *argv], cwd=cwd, capture_output=True, text=True,
                           input="/exit\n", timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, f"README line failed: polymodal {line}\n{r.stderr[-2000:]}"
        ran.append(line)
    assert len(ran) >= 7, (ran, skipped)
    # the README's own corpus recipe ended in a resumed run folder with the Trainer's layout
    run = cwd / "runs" / "nano"
    for f in ("config.json", "metrics.jsonl", "curve.png", "summary.json", "checkpoints/latest", "model/config.json"):
        assert (run / f).exists(), f
