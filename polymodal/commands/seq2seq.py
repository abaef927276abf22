"""``polymodal train-seq2seq``, ``polymodal translate``, ``polymodal summarize``: T5/BART encoder-decoders
trained from scratch on the one engine (``polymodal.train.tasks.seq2seq``), decoded with the
package's one beam search (``polymodal.generate.seq2seq``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

Preset = Literal["t5-tiny", "t5-v1_1-tiny", "bart-tiny", "t5-small", "t5-v1_1-small", "bart-base"]


def train_seq2seq(data: str, out: str = "runs/train-seq2seq", task: Literal["translate", "summarize"] = "translate",
                  preset: Preset = "t5-tiny", src_lang: str = "en", tgt_lang: str = "de",
                  tokenizer: Literal["unigram", "bpe"] = "unigram", vocab_size: int = 8000, n_layer: int = 0,
                  n_embd: int = 0, n_head: int = 0, max_src_len: int = 128, max_tgt_len: int = 128,
                  bucket: int = 50, batch_size: int = 32, max_steps: int = 3000, epochs: float = 1.0,
                  minutes: float = 60.0, eval_every: int = 250, lr: float = 1e-3, warmup: float = 200,
                  weight_decay: float = 0.01, dropout: float = 0.1, grad_accum: int = 1, patience: int = 0,
                  limit: int = 0, val_limit: int = 0, score: int = 0, num_beams: int = 4, seed: int = 0,
                  device: str = "auto", dtype: Literal["auto", "bf16", "fp32"] = "auto", threads: int = 0,
                  compile: bool = False, log_every: int = 10, progress: bool = True, resume: bool = False,
                  overwrite: bool = False) -> dict:
    """Trains a T5/BART-style model (and its shared tokenizer) on a translation or summarisation corpus.

    Args:
        data: folder with the corpus: {split}.{lang} text files (Multi30k) or {split}*.jsonl with article/summary (BBC)
        out: run folder (config.json, metrics.jsonl, curve.png, tb/, checkpoints/, model/ = best by val loss)
        task: translate (aligned text files) or summarize (JSONL article -> summary)
        preset: t5-tiny, t5-v1_1-tiny, bart-tiny (CPU-sized), t5-small, t5-v1_1-small, bart-base
        src_lang: source file suffix (translate)
        tgt_lang: target file suffix (translate)
        tokenizer: unigram or bpe, trained on source + target training text (one shared vocabulary)
        vocab_size: tokenizer vocabulary size
        n_layer: override the preset's layer count (0 = keep)
        n_embd: override the preset's width (0 = keep; head_dim follows n_embd / n_head)
        n_head: override the preset's head count (0 = keep)
        max_src_len: source tokens kept (EOS included)
        max_tgt_len: target tokens kept (EOS included)
        bucket: length-bucketed batches: sort pools of this many batches by length (less padding); 0 = plain random batches
        batch_size: sentence pairs per step, over all ranks
        max_steps: optimizer steps (0 = --epochs over the training pairs)
        epochs: passes over the training pairs when --max-steps is 0
        minutes: wall-clock budget, 0 = no limit; the schedule ends at whichever of --max-steps / --minutes comes first
        eval_every: steps between val-loss evaluations (and checkpoints); 0 = once per epoch
        lr: peak learning rate (linear warmup, cosine decay to 0.1 x lr)
        warmup: warmup steps (>= 1) or a fraction of the planned steps (< 1)
        weight_decay: AdamW weight decay (weight matrices only)
        dropout: dropout in every block
        grad_accum: micro-batches per optimizer step
        patience: stop after this many evaluations without a better val loss (0 = never)
        limit: use only the first N training pairs (0 = all)
        val_limit: use only the first N val pairs (0 = all)
        score: after training, decode the first N val sources with the best model and report BLEU/chrF or ROUGE (0 = skip)
        num_beams: beam size of the --score decoding
        seed: seed of initialisation and batch order
        device: auto, cpu, cuda, cuda:N
        dtype: auto, bf16 or fp32
        threads: torch threads (0 = torch's default)
        compile: torch.compile the model
        log_every: steps between train records in metrics.jsonl
        progress: show the progress bar
        resume: continue from <out>/checkpoints/latest (the run's own tokenizer and model config)
        overwrite: start over in an --out folder that already holds checkpoints (deletes them)
    """
    flags = dict(locals())
    from ..train.tasks.seq2seq import Seq2SeqTask, resumed_state
    from ..train.trainer import run

    tok, config = resumed_state(out) if resume else (None, None)
    t = Seq2SeqTask(data, task, preset, src_lang=src_lang, tgt_lang=tgt_lang, tokenizer=tok, tokenizer_kind=tokenizer,
                    vocab_size=vocab_size, model_config=config,
                    model_overrides=dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head), dropout=dropout,
                    max_src_len=max_src_len, max_tgt_len=max_tgt_len, batch_size=batch_size, bucket=bucket,
                    limit=limit, val_limit=val_limit, seed=seed)
    print(f"train-seq2seq: {json.dumps(t.summary())}", flush=True)
    # the recipe's fixed choices: Adam's beta2 of Vaswani et al. (0.98), a floor of 0.1 x lr
    res = run(t, flags, beta2=0.98, min_lr=0.1)
    if score and int(os.environ.get("RANK", "0")) == 0:
        res["scores"] = _score(res["model"], data, task, src_lang, tgt_lang, score, num_beams, max_src_len,
                               max_tgt_len, Path(out))
    print(json.dumps({k: res.get(k) for k in ("step", "stop_reason", "best", "best_step", "last", "scores", "model")}))
    return res


def _score(model_dir: str, data: str, task: str, src_lang: str, tgt_lang: str, n: int, num_beams: int,
           max_src_len: int, max_tgt_len: int, out: Path) -> dict:
    """BLEU/chrF or ROUGE of the best model on the first ``n`` val pairs; hypotheses and scores
    are written next to the run (val.hyp.txt, scores.json)."""
    from ..data.pairs import read_pairs
    from ..eval.seq2seq import evaluate_seq2seq
    from ..interop import load
    from ..io import atomic_write_text

    model, tok = load(model_dir)
    pairs = read_pairs(data, task, "val", src_lang, tgt_lang)[:n]
    scores, hyps = evaluate_seq2seq(model, tok, pairs, task, num_beams=num_beams, max_new_tokens=max_tgt_len,
                                    max_src_len=max_src_len, no_repeat_ngram_size=3 if task == "summarize" else 0)
    atomic_write_text(out / "val.hyp.txt", "\n".join(hyps) + "\n")
    atomic_write_text(out / "scores.json", json.dumps({"n": len(pairs), "num_beams": num_beams, **scores}, indent=2))
    return scores


def _decode(model: str, texts: list[str], output: str, device: str, **kw) -> str:
    from ..generate.seq2seq import generate_seq2seq_texts
    from ..interop import load
    from ..io import atomic_write_text

    m, tok = load(model, device=device)
    if tok is None:
        raise ValueError(f"{model}: the checkpoint has no tokenizer files")
    hyps = generate_seq2seq_texts(m, tok, texts, do_sample=False, **kw)
    atomic_write_text(Path(output), "\n".join(hyps) + "\n")  # UTF-8 whatever the locale
    print(f"{len(hyps)} outputs -> {output}")
    return output


def translate(model: str, input: str, output: str, num_beams: int = 4, max_new_tokens: int = 64,
              length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, batch_size: int = 32,
              max_src_len: int = 128, device: str = "auto") -> str:
    """Translates a text file (one sentence per line) with a seq2seq model; writes one line per input line.

    Args:
        model: a train-seq2seq run folder (its best model), a polymodal seq2seq folder or a Hugging Face T5/BART folder
        input: text file, one source sentence per line
        output: where to write the translations (one per line, same order)
        num_beams: beam size (1 = greedy)
        max_new_tokens: longest output
        length_penalty: beam score = sum log p / length ** length_penalty (> 0 favours longer outputs)
        no_repeat_ngram_size: forbid repeating any n-gram (0 = off)
        batch_size: sentences decoded together
        max_src_len: source tokens kept
        device: auto, cpu, cuda, cuda:N
    """
    from ..data.pairs import read_lines

    return _decode(model, read_lines(input), output, device, num_beams=num_beams, max_new_tokens=max_new_tokens,
                   length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, batch_size=batch_size,
                   max_src_len=max_src_len)


def summarize(model: str, input: str, output: str, num_beams: int = 4, max_new_tokens: int = 160,
              length_penalty: float = 1.0, no_repeat_ngram_size: int = 3, batch_size: int = 8,
              max_src_len: int = 512, device: str = "auto") -> str:
    """Summarises documents (JSONL with an 'article' field, or a text file with one document per line).

    Args:
        model: a train-seq2seq run folder (its best model), a polymodal seq2seq folder or a Hugging Face T5/BART folder
        input: JSONL file (field 'article') or a text file, one document per line
        output: where to write the summaries (one per line, same order)
        num_beams: beam size (1 = greedy)
        max_new_tokens: longest summary
        length_penalty: beam score = sum log p / length ** length_penalty (> 0 favours longer outputs)
        no_repeat_ngram_size: forbid repeating any n-gram (0 = off)
        batch_size: documents decoded together
        max_src_len: source tokens kept
        device: auto, cpu, cuda, cuda:N
    """
    from ..data.pairs import read_documents

    return _decode(model, read_documents(input), output, device, num_beams=num_beams, max_new_tokens=max_new_tokens,
                   length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, batch_size=batch_size,
                   max_src_len=max_src_len)
