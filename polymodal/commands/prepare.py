"""``polymodal prepare``: text files -> a tokenizer and train.bin/val.bin token shards."""
from __future__ import annotations

from typing import Literal


def prepare(inputs: list[str], out: str, tokenizer: Literal["char", "bpe"] = "char", vocab_size: int = 8192,
            val_fraction: float = 0.1, val: str | None = None, tokenizer_from: str | None = None) -> dict:
    """Tokenise text files into train.bin/val.bin token shards plus the tokenizer.

    Args:
        inputs: UTF-8 text files (a folder means its *.txt files), concatenated with the tokenizer's EOS between files (char: none).
        out: output folder (replaced atomically; refuses a non-empty folder that is not a previous output).
        tokenizer: "char" (vocabulary = the characters of inputs and val) or "bpe" (byte-level BPE trained on inputs).
        vocab_size: BPE vocabulary size (ignored for char and with --tokenizer-from).
        val_fraction: share of the token stream, taken from its end, used as validation when --val is not given.
        val: a separate UTF-8 file to use as the validation split.
        tokenizer_from: folder with an existing tokenizer.json (a model or tokenizer folder) to use instead of training one.
    """
    from ..data.prepare import prepare as run

    return run(inputs, out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, val=val,
               tokenizer_from=tokenizer_from)
