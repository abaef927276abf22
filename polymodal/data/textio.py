"""Reading UTF-8 text files so that bad input names the file and the line.

Python's own ``UnicodeDecodeError`` says only "'utf-8' codec can't decode byte 0xe9 in position
1234": neither the file nor the line. Every data reader that takes a user's text file (captions,
questions, reference lists) goes through :func:`read_utf8`, which says both.
"""
from __future__ import annotations

from pathlib import Path


def read_utf8(path: str | Path) -> str:
    """The text of ``path``; a missing file raises ``FileNotFoundError`` and invalid UTF-8 a
    ``ValueError`` of the form ``path:LINE: not valid UTF-8 (byte N: reason)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (errors as :func:`read_utf8`; a folder or a missing file
    is a ``FileNotFoundError`` naming it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return read_utf8(path).splitlines()
