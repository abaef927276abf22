"""``polymodal train-seq2seq``, ``polymodal translate``, ``polymodal summarize``.

Training minimises the teacher-forced cross-entropy of the target given the source,
-sum_t log p(y_t | y_<t, x) (Sutskever et al., 2014; Vaswani et al., 2017), with AdamW
and linear warmup + cosine decay (``polymodal.train``). One tokenizer (BPE or Unigram,
Kudo 2018) is trained on the source AND target training text, so both sides share one
vocabulary and the (tied) embedding. Decoding uses ``generate_seq2seq`` (the package's
one sampler and beam search).

Data formats (any folder with these files):
* translation (Multi30k): ``{split}.{src_lang}`` and ``{split}.{tgt_lang}``, line i of one
  translating line i of the other;
* summarisation (BBC News Summary): ``{split}*.jsonl`` with ``article`` and ``summary`` fields.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch


SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad / eos / unk layout


# -- data ------------------------------------------------------------------------------------------

def read_pairs(data: str | Path, task: str, split: str, src_lang: str = "en", tgt_lang: str = "de") -> list[tuple[str, str]]:
    """(source, target) texts of one split (see the module docstring for the formats)."""
    data = Path(data)
    if task == "translate":
        fs, ft = data / f"{split}.{src_lang}", data / f"{split}.{tgt_lang}"
        for f in (fs, ft):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (translation data is {{split}}.{{lang}} text files)")
        src = fs.read_text(encoding="utf-8").splitlines()
        tgt = ft.read_text(encoding="utf-8").splitlines()
        if len(src) != len(tgt):
            raise ValueError(f"{fs} has {len(src)} lines but {ft} has {len(tgt)}: the files must be aligned")
        return list(zip(src, tgt))
    if task == "summarize":
        files = sorted(data.glob(f"{split}*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{data}: no {split}*.jsonl file (summarisation data is JSONL with "
                                    "'article' and 'summary')")
        pairs = []
        for f in files:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    pairs.append((rec["article"], rec["summary"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{f}:{n}: not a JSON object with 'article' and 'summary' ({e})") from None
        return pairs
    raise ValueError(f"unknown task {task!r}: expected 'translate' or 'summarize'")


def train_shared_tokenizer(texts: list[str], vocab_size: int, kind: str = "unigram"):
    """A SentencePiece-style (Metaspace) Unigram or BPE tokenizer with <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from .tokenizers import Tokenizer

    if kind == "unigram":  # Kudo 2018: prune a large seed vocabulary by corpus likelihood
        tok = HFTok(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token="<unk>",
                                          show_progress=False)
    elif kind == "bpe":  # Sennrich et al. 2016: merge the most frequent symbol pairs
        tok = HFTok(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                      show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'unigram' or 'bpe'")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer.from_tokenizers(tok, eos="</s>", pad="<pad>", unk="<unk>", kind=kind)


def _write_text(path: str | Path, text: str) -> None:
    """Atomic UTF-8 write (translations hold non-ASCII text whatever the locale)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids + EOS, truncated to max_len (EOS kept)."""
    out = []
    for t in texts:
        ids = tok.encode(t)[: max_len - 1]
        out.append(ids + [tok.eos_id])
    return out


def _pad(rows: list[list[int]], pad: int, fill: int | None = None) -> torch.Tensor:
    t = max(len(r) for r in rows)
    x = torch.full((len(rows), t), pad if fill is None else fill, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x


def _batches(src: list[list[int]], tgt: list[list[int]], batch_size: int, pad: int, g: torch.Generator):
    """Endless random batches; within a pool of 50 batches rows are grouped by length (less padding)."""
    n = len(src)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        pool = batch_size * 50
        for p in range(0, n, pool):
            chunk = sorted(perm[p: p + pool], key=lambda i: len(src[i]))
            groups = [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
            for j in torch.randperm(len(groups), generator=g).tolist():
                idx = groups[j]
                s = _pad([src[i] for i in idx], pad)
                yield s, (s != pad).long(), _pad([tgt[i] for i in idx], pad, fill=-100)


@torch.no_grad()
def _val_loss(model, src, tgt, pad: int, batch_size: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(src), batch_size):
        s = _pad(src[i: i + batch_size], pad)
        y = _pad(tgt[i: i + batch_size], pad, fill=-100)
        n = int((y != -100).sum())
        total += model.loss(s, (s != pad).long(), y).item() * n
        count += n
    model.train()
    return total / max(count, 1)


# -- commands --------------------------------------------------------------------------------------

def train_seq2seq(data: str, out: str = "runs/seq2seq", task: Literal["translate", "summarize"] = "translate",
                  preset: str = "t5-tiny", src_lang: str = "en", tgt_lang: str = "de",
                  tokenizer: Literal["unigram", "bpe"] = "unigram", vocab_size: int = 8000, n_layer: int = 0,
                  n_embd: int = 0, n_head: int = 0, max_src_len: int = 128, max_tgt_len: int = 128,
                  batch_size: int = 32, steps: int = 3000, lr: float = 1e-3, warmup: int = 200,
                  weight_decay: float = 0.01, dropout: float = 0.1, eval_every: int = 250, minutes: float = 60.0,
                  limit: int = 0, seed: int = 0) -> dict:
    """Trains a T5/BART-style model (and its shared tokenizer) on a translation or summarisation corpus.

    Args:
        data: folder with the corpus (Multi30k-style text files or BBC-style JSONL).
        out: output folder: the best checkpoint (by validation loss) with its tokenizer, and train_log.jsonl.
        task: translate (parallel text files) or summarize (JSONL article -> summary).
        preset: a Seq2SeqConfig preset (t5-tiny, t5-v1_1-tiny, bart-tiny, t5-small, ...).
        src_lang: source file suffix (translation).
        tgt_lang: target file suffix (translation).
        tokenizer: unigram or bpe, trained on source + target training text (one shared vocabulary).
        vocab_size: tokenizer vocabulary size.
        n_layer: override the preset's layer count (0 = keep).
        n_embd: override the preset's width (0 = keep; head_dim follows n_embd / n_head).
        n_head: override the preset's head count (0 = keep).
        max_src_len: source tokens kept (EOS included).
        max_tgt_len: target tokens kept (EOS included).
        batch_size: sentence pairs per step.
        steps: optimizer steps (the cosine decays to 0.1 * lr at this step, or when --minutes runs out if sooner).
        lr: peak learning rate.
        warmup: linear warmup steps.
        weight_decay: AdamW weight decay (weight matrices only).
        dropout: dropout in every block.
        eval_every: steps between validation-loss evaluations (and checkpoint saves).
        minutes: wall-clock budget; training stops (and is evaluated) when it runs out.
        limit: use only the first N training pairs (0 = all; for quick runs).
        seed: seed of initialisation and batch order.
    """
    from .models.registry import save_model
    from .models.seq2seq import Seq2Seq, Seq2SeqConfig
    from .train.optim import make_adamw
    from .train.schedule import lr_at

    t0 = time.time()
    torch.manual_seed(seed)
    train = read_pairs(data, task, "train", src_lang, tgt_lang)
    val = read_pairs(data, task, "val", src_lang, tgt_lang)
    if limit:
        train = train[:limit]
    tok = train_shared_tokenizer([s for s, _ in train] + [t for _, t in train], vocab_size, tokenizer)
    src, tgt = _encode(tok, [s for s, _ in train], max_src_len), _encode(tok, [t for _, t in train], max_tgt_len)
    vsrc, vtgt = _encode(tok, [s for s, _ in val], max_src_len), _encode(tok, [t for _, t in val], max_tgt_len)
    over: dict = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=None,
                      dropout=dropout)
    base = Seq2SeqConfig.presets.get(preset)
    if base is None:
        raise ValueError(f"unknown seq2seq preset {preset!r}; choose from {sorted(Seq2SeqConfig.presets)}")
    # T5 starts the target with <pad>, BART with </s>
    over["decoder_start_token_id"] = tok.eos_id if base["variant"] == "bart" else tok.pad_id
    for k, v in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        if v:
            over[k] = v
    if n_embd or n_head:
        over["head_dim"] = (n_embd or base["n_embd"]) // (n_head or base["n_head"])
    if base.get("block_size"):
        over["block_size"] = max(base["block_size"], max_src_len, max_tgt_len)
    config = Seq2SeqConfig.from_preset(preset, **over)
    model = Seq2Seq(config)
    opt = make_adamw(model, lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    batches = _batches(src, tgt, batch_size, tok.pad_id, g)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    log_lines: list[str] = []
    best = math.inf
    history = []
    print(f"train-seq2seq: {len(train)} pairs, vocab {tok.vocab_size}, {preset} "
          f"({model.num_params() / 1e6:.1f}M params)", flush=True)
    model.train()
    step, ema = 0, None
    while step < steps:
        # the cosine ends at whichever comes first, --steps or --minutes: a run cut short by its
        # time budget still anneals instead of stopping at a high learning rate
        sched_step = step
        if step >= warmup and minutes:
            frac = (time.time() - t0) / (60 * minutes)
            sched_step = max(step, warmup + int(frac * (steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr_at(sched_step, lr=lr, warmup=warmup, decay_steps=steps, min_lr=0.1 * lr)
        s, m, y = next(batches)
        loss = model.loss(s, m, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        out_of_time = (time.time() - t0) > minutes * 60
        if step % eval_every == 0 or step == steps or out_of_time:
            vl = _val_loss(model, vsrc, vtgt, tok.pad_id)
            rec = {"step": step, "train_loss": round(ema, 4), "val_loss": round(vl, 4),
                   "minutes": round((time.time() - t0) / 60, 2)}
            history.append(rec)
            log_lines.append(json.dumps(rec))
            _write_text(log_path, "\n".join(log_lines) + "\n")
            print(f"step {step}: train {ema:.3f} val {vl:.3f} ({rec['minutes']} min)", flush=True)
            if vl < best:
                best = vl
                save_model(model, out_dir / "model", tokenizer=tok)
        if out_of_time:
            break
    return {"best_val_loss": best, "history": history, "model": str(out_dir / "model")}


def _decode_texts(model_path: str, texts: list[str], *, num_beams: int, max_new_tokens: int, length_penalty: float,
                  no_repeat_ngram_size: int, batch_size: int, max_src_len: int) -> list[str]:
    from .interop import load
    from .generate import generate_seq2seq

    model, tok = load(model_path)
    if tok is None:
        raise ValueError(f"{model_path}: the checkpoint has no tokenizer files")
    pad = model.config.pad_token_id or 0
    ids = _encode(tok, texts, max_src_len)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batch similar lengths: less padding
    out: list[str] = [""] * len(ids)
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        s = _pad([ids[i] for i in idx], pad)
        gen = generate_seq2seq(model, s, (s != pad).long(), max_new_tokens=max_new_tokens, num_beams=num_beams,
                               length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                               do_sample=False)
        for i, row in zip(idx, gen):
            out[i] = tok.decode(row).strip().replace("\n", " ")
    return out


def translate(model: str, input: str, output: str, num_beams: int = 4, max_new_tokens: int = 64,
              length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, batch_size: int = 32,
              max_src_len: int = 128) -> str:
    """Translates a text file (one sentence per line) with a seq2seq model; writes one line per input line.

    Args:
        model: a polymodal seq2seq folder (e.g. runs/seq2seq/model) or a Hugging Face T5/BART folder.
        input: text file, one source sentence per line.
        output: where to write the translations (one per line, same order).
        num_beams: beam size (1 = greedy).
        max_new_tokens: longest output.
        length_penalty: beam score = sum log p / length ** length_penalty (> 0 favours longer outputs).
        no_repeat_ngram_size: forbid repeating any n-gram (0 = off).
        batch_size: sentences decoded together.
        max_src_len: source tokens kept.
    """
    lines = Path(input).read_text(encoding="utf-8").splitlines()
    hyps = _decode_texts(model, lines, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                         batch_size=batch_size, max_src_len=max_src_len)
    _write_text(Path(output), "\n".join(hyps) + "\n")
    return output


def summarize(model: str, input: str, output: str, num_beams: int = 4, max_new_tokens: int = 160,
              length_penalty: float = 1.0, no_repeat_ngram_size: int = 3, batch_size: int = 8,
              max_src_len: int = 512) -> str:
    """Summarises documents (JSONL with an 'article' field, or a text file with one document per line).

    Args:
        model: a polymodal seq2seq folder or a Hugging Face T5/BART folder.
        input: JSONL file (field 'article') or a text file, one document per line.
        output: where to write the summaries (one per line, same order).
        num_beams: beam size (1 = greedy).
        max_new_tokens: longest summary.
        length_penalty: beam score = sum log p / length ** length_penalty (> 0 favours longer outputs).
        no_repeat_ngram_size: forbid repeating any n-gram (0 = off).
        batch_size: documents decoded together.
        max_src_len: source tokens kept.
    """
    path = Path(input)
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["article"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with an 'article' field ({e})") from None
    else:
        docs = path.read_text(encoding="utf-8").splitlines()
    hyps = _decode_texts(model, docs, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                         batch_size=batch_size, max_src_len=max_src_len)
    _write_text(Path(output), "\n".join(hyps) + "\n")
    return output
