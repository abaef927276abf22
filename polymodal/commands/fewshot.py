"""``polymodal fewshot``: GPT-3-style k-shot classification by label likelihood (``polymodal.eval.fewshot``)."""
from __future__ import annotations

import json as jsonlib
from typing import Literal


def fewshot_cmd(task: str = "sst2", k: list[int] = [0, 1, 4, 8], n_eval: int = 200, model: str | None = None,
                seed: int = 0, data: str | None = None, batch_size: int = 8,
                normalize: Literal["none", "token", "char"] = "none", json: bool = False) -> list[dict]:
    """k-shot in-context classification by label likelihood (GPT-3 sec. 2.4); prints accuracy per k.

    Args:
        task: task name (sst2).
        k: numbers of demonstrations to evaluate.
        n_eval: validation examples to classify (the first n of the split).
        model: polymodal folder, Hugging Face folder or .gguf file; default SmolLM2-135M-Instruct.
        seed: seed for drawing the demonstrations.
        data: folder holding the task's train/val files (default the shared data folder).
        batch_size: sequences per forward pass.
        normalize: none | token | char (length normalisation of the candidate log-likelihood).
        json: print the rows as one JSON list instead of a table
    """
    from ..data.tasks import load_split
    from ..eval.fewshot import fewshot_classify, format_table
    from ..interop import load

    lm, tok = load(model)
    lm.eval()
    if tok is None:
        raise ValueError(f"the checkpoint {model!r} carries no tokenizer")
    train = load_split(task, "train", data)
    val = load_split(task, "val", data)
    rows = []
    for kk in k:
        rows.append(fewshot_classify(lm, tok, task, kk, seed, n_eval, data, batch_size=batch_size,
                                     normalize=normalize, train=train, val=val))
        if not json:
            print(f"k={kk}: accuracy {rows[-1]['accuracy']:.3f} ({rows[-1]['seconds']:.1f}s)", flush=True)
    if json:
        print(jsonlib.dumps(rows))
        return rows
    print(f"\n{task}, seed {seed}, first {rows[0]['n']} validation examples; majority = always the train "
          f"split's most frequent label")
    print(format_table(rows))
    return rows
