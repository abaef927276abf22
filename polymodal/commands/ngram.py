"""``polymodal ngram``: an interpolated modified Kneser-Ney character LM (``polymodal.models.ngram``),
scored on a val file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ..models.ngram import char_baseline


def ngram_cmd(train: str, val: str, order: int = 5, level: Literal["char"] = "char") -> dict:
    """Fit a modified Kneser-Ney n-gram LM and print its val cross-entropy (nats/char) and perplexity.

    Args:
        train: training text file (UTF-8)
        val: held-out text file (UTF-8); chars unseen in train map to <unk>
        order: n-gram order (context = order-1 previous tokens)
        level: tokenisation level (only "char")
    """
    if level != "char":
        raise ValueError(f"ngram: level must be 'char', got {level!r}")
    texts = []
    for p in (train, val):
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"ngram: no such file {path}")
        from ..tokenizers import read_text_file

        texts.append(read_text_file(path))  # a non-UTF-8 file is named with its line
    r = char_baseline(texts[0], texts[1], order=order)
    print(json.dumps({"order": r["order"], "vocab_size": r["vocab_size"],
                      "val_cross_entropy_nats_per_char": round(r["cross_entropy"], 6),
                      "val_perplexity": round(r["perplexity"], 6), "n_unk": r["n_unk"],
                      "fit_s": round(r["fit_s"], 3), "eval_s": round(r["eval_s"], 3)}))
    return r
