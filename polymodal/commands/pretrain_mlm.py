"""``polymodal pretrain-mlm``: masked-LM pretraining of the encoders (docs/mlm.md), on the one engine."""
from __future__ import annotations

import json
from typing import Literal

from ..train.tasks.mlm import MLMTask, resume_tokenizer
from ..train.trainer import args_from_flags, run


def pretrain_mlm(data: list[str], out: str = "runs/pretrain-mlm", preset: str | None = None,
                 model: str | None = None, objective: Literal["mlm", "mlm+nsp", "mlm+sop"] | None = None,
                 whole_word: bool = False, vocab_size: int = 8000, lowercase: bool = True, max_length: int = 128,
                 batch_size: int = 32, max_steps: int = 1000, epochs: float = 1.0, minutes: float = 0.0,
                 eval_every: int = 100, lr: float | None = None, warmup: float = 0.05, weight_decay: float = 0.01,
                 grad_accum: int = 1, mask_prob: float = 0.15, val_fraction: float = 0.05, max_val: int = 1000,
                 text_field: str | None = None, patience: int = 0, log_every: int = 10, seed: int = 0,
                 device: str = "auto", dtype: Literal["auto", "bf16", "fp32"] = "auto", threads: int = 0,
                 compile: bool = False, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Masked-LM pretraining (BERT/RoBERTa/ALBERT/MiniLM) with dynamic 80/10/10 masking and NSP or SOP.

    Args:
        data: text files or folders (.txt: documents separated by blank lines, a sentence per line; .tsv with a header; .jsonl)
        out: run folder (model/ loads into finetune --model; config.json, metrics.jsonl, checkpoints/, curve.png, summary.json)
        preset: train from scratch: an encoder preset (bert-base, bert-large, roberta-base, albert-base-v2, minilm-l6, tiny-bert, tiny-roberta, tiny-albert)
        model: continue pretraining this encoder (polymodal/HF folder or run folder, e.g. all-MiniLM-L6-v2) with its own tokenizer
        objective: mlm, mlm+nsp or mlm+sop (default: BERT nsp, ALBERT sop, RoBERTa mlm only)
        whole_word: mask all word pieces of a chosen word together
        vocab_size: vocabulary of the tokenizer trained with --preset
        lowercase: lower-case the text (WordPiece tokenizers trained with --preset)
        max_length: tokens per input, special tokens included (capped by the model's positions)
        batch_size: sequences per step (divisible by the number of ranks)
        max_steps: optimizer steps (0 = --epochs passes over the training sequences)
        epochs: passes over the data when --max-steps is 0
        minutes: wall-clock budget (0 = no limit); the linear decay is fitted to the steps that fit
        eval_every: evaluate (and checkpoint) every N steps
        lr: peak learning rate (default 5e-4 from scratch, 5e-5 when continuing a --model)
        warmup: linear warm-up: a fraction of the steps (< 1) or a step count, then linear decay to 0
        weight_decay: AdamW weight decay (not on biases, norms and embeddings)
        grad_accum: micro-batches of --batch-size accumulated per optimizer step
        mask_prob: fraction of tokens (or words) chosen for prediction
        val_fraction: fraction of the sentences (whole documents from the end) held out for validation
        max_val: evaluate on at most this many held-out sequences
        text_field: the text column/field of .tsv/.jsonl inputs (default: text, sentence, article, ...)
        patience: stop after this many evaluations without a lower val MLM loss (0 = never)
        log_every: write a training record every N steps
        seed: random seed (pairs, masks, order, init)
        device: auto, cpu, cuda or cuda:N
        dtype: auto (bf16 autocast where native), bf16 or fp32
        threads: torch CPU threads (0 = torch's default)
        compile: torch.compile the model
        resume: continue the run in --out from its latest checkpoint (same recipe, same tokenizer)
        overwrite: start over in an --out that already holds checkpoints
        progress: show a progress bar
    """
    flags = dict(locals())
    flags["lr"] = lr if lr is not None else (5e-4 if preset is not None else 5e-5)
    args_from_flags(flags)  # a bad shared flag (--minutes -1) fails before the text is read
    task = MLMTask(data, preset, model, objective, whole_word, vocab_size, lowercase, max_length, batch_size,
                   mask_prob, val_fraction, max_val, text_field, weight_decay, seed,
                   tokenizer=resume_tokenizer(out) if resume else None)
    info = task.summary()
    print(f"[pretrain-mlm] {info['arch']} ({info['objective']}{', whole-word' if whole_word else ''}, vocab "
          f"{info['vocab_size']}): {info['train_sequences']} train / {info['eval_sequences']} {info['eval_on']} "
          f"sequences of <= {info['max_length']} tokens", flush=True)
    summary = {**run(task, flags, schedule="linear"), **info}
    print(json.dumps({k: summary[k] for k in ("step", "stop_reason", "best", "last", "model")}, default=str))
    return summary
