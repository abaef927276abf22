"""VQA commands: ``train-vqa``, ``vqa``, ``eval-vqa``.

VQA as classification (Antol et al., 2015, sec. 5; Teney et al., 2018, "Tips and Tricks for
Visual Question Answering", sec. 3): the model scores every answer of a fixed vocabulary (the
training answers, most frequent first) from the pooled output of a fusion encoder,
VisualBERT (Li et al., 2019) or ViLBERT (Lu et al., 2019), see ``polymodal.models.fusion``.

* Targets: a class index and cross-entropy when every question has one answer (easy-VQA,
  DAQUAR); the soft scores min(#humans/3, 1) with binary cross-entropy when there are several
  human answers (VQAv2), both through ``fusion.vqa_loss``.
* Images: the model's own pixel front end (``image_features``: a small ResNet stem or raw
  patches), fed square-resized images cached once as uint8. Questions of the same image share
  one batch (batches are built image by image), so the stem runs once per image, not once per
  question: easy-VQA has ~10 questions per image.
* Evaluation: the VQA soft accuracy where a question has several human answers and exact match
  of the normalised strings where it has one (``polymodal.eval.vqa.evaluate_vqa``), next to the
  most-frequent-answer baseline (always predict the commonest training answer).

``vqa`` and ``eval-vqa`` also take a generative VLM checkpoint (family "vlm"): its answer is
generated text (``polymodal.vlm_commands.answer_question``), scored the same way.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import torch

from .data.vqa import VQAExample


# ---------------------------------------------------------------------------------------
# tokenizer, pixels, batches
# ---------------------------------------------------------------------------------------
def build_question_tokenizer(questions: Sequence[str]):
    """A lower-cased word-level tokenizer over the training questions ([CLS] q [SEP], like BERT's
    input; unseen words map to [UNK]). VQA questions use a few thousand words at most, so a word
    vocabulary keeps sequences short and needs no subword training."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    from .tokenizers import Tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()  # words and punctuation, like BERT's basic tokenizer
    words = Counter(w for q in questions for w, _ in pre.pre_tokenize_str(norm.normalize_str(q)))
    vocab = {s: i for i, s in enumerate(specials)}
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):  # frequent words first
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return Tokenizer.from_tokenizers(tok, pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", kind="word")


def encode_question(tokenizer, question: str, max_len: int) -> list[int]:
    """[CLS] words [SEP], truncated to ``max_len`` with the [SEP] kept."""
    ids = tokenizer.encode(question, add_special_tokens=True)
    if len(ids) > max_len:
        ids = ids[:max_len - 1] + ids[-1:]
    return ids


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


class PixelCache:
    """Every distinct image of a data set, resized once (``ImageProcessor.resize_and_crop``) and
    kept as uint8 (B, 3, S, S); ``batch`` normalises on the fly (4x less memory than float)."""

    def __init__(self, processor, paths: Sequence[Path], progress: bool = False):
        import numpy as np
        from tqdm import tqdm

        from .data.images import load_image

        self.processor = processor
        self.index: dict[Path, int] = {}
        arrays = []
        for p in tqdm(list(dict.fromkeys(paths)), desc="images", disable=not progress, dynamic_ncols=True):
            self.index[p] = len(arrays)
            arrays.append(np.asarray(processor.resize_and_crop(load_image(p)), dtype=np.uint8))
        self.data = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.mean = torch.tensor(processor.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.std).view(1, 3, 1, 1)

    def batch(self, rows: Sequence[int], generator: torch.Generator | None = None, flip: bool = False) -> torch.Tensor:
        x = self.data[list(rows)].float() * self.processor.rescale_factor
        if flip and generator is not None:  # random horizontal and vertical flips, per image
            h, v = torch.rand(2, len(rows), generator=generator) < 0.5
            x[h] = x[h].flip(-1)
            x[v] = x[v].flip(-2)
        return (x - self.mean) / self.std


def _logits(model, token_rows: Sequence[Sequence[int]], image_rows: Sequence[int], cache: PixelCache, pad_id: int,
            generator: torch.Generator | None = None, flip: bool = False) -> torch.Tensor:
    """VQA logits of a batch; the pixel front end runs once per distinct image of the batch."""
    uniq = list(dict.fromkeys(image_rows))
    where = {r: i for i, r in enumerate(uniq)}
    device = next(model.parameters()).device
    feats = model.image_features(cache.batch(uniq, generator, flip).to(device))
    feats = feats[torch.tensor([where[r] for r in image_rows], device=device)]
    ids, mask = _pad(token_rows, pad_id)
    return model.vqa_logits(ids.to(device), feats, mask.to(device))


def _targets(examples: Sequence[VQAExample], index: dict[str, int], single: bool):
    """Class ids (single-answer sets) or soft-score rows {answer id: min(n/3, 1)} (several humans)."""
    from .eval.vqa import normalize_answer, soft_score

    out = []
    for e in examples:
        counts = Counter(normalize_answer(a) for a in e.answers)
        if single:
            out.append(index.get(normalize_answer(e.answers[0]), -1))
        else:
            out.append({index[a]: soft_score(n) for a, n in counts.items() if a in index})
    return out


def _target_tensor(rows: list, n_answers: int, single: bool) -> torch.Tensor:
    if single:
        return torch.tensor(rows, dtype=torch.long)
    t = torch.zeros(len(rows), n_answers)
    for i, r in enumerate(rows):
        for a, s in r.items():
            t[i, a] = s
    return t


def gold(examples: Sequence[VQAExample]) -> list[str | list[str]]:
    """What ``evaluate_vqa`` scores against: one string (exact match) or the human answers (soft)."""
    return [e.answers[0] if len(e.answers) == 1 else list(e.answers) for e in examples]


def majority_baseline(train: Sequence[VQAExample], evaluated: Sequence[VQAExample]) -> tuple[str, float]:
    """(the commonest training answer, its accuracy when predicted for every evaluated question)."""
    from .data.vqa import answer_space
    from .eval.vqa import evaluate_vqa

    top = answer_space(train)[0]
    return top, evaluate_vqa([top] * len(evaluated), gold(evaluated))["accuracy"]


@torch.no_grad()
def predict_fusion(model, tokenizer, cache: PixelCache, examples: Sequence[VQAExample], batch_size: int = 256,
                   top_k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-k (answer, probability) per question; questions of one image are batched together."""
    answers = model.config.answers
    max_len = model.config.max_text_len
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: cache.index[examples[i].image])
    out: list = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [encode_question(tokenizer, examples[i].question, max_len) for i in idx]
        logits = _logits(model, rows, [cache.index[examples[i].image] for i in idx], cache, tokenizer.pad_id)
        p, j = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        for r, i in enumerate(idx):
            out[i] = [(answers[a], round(float(q), 5)) for a, q in zip(j[r].tolist(), p[r].tolist())]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
def build_fusion(arch: str, answers: Sequence[str], vocab_size: int, max_text_len: int, image_size: int = 64,
                 patch_size: int = 16, image_stem: str = "conv", stem_width: int = 128, width: int = 128,
                 layers: int = 3, single_layers: int = 1, heads: int = 4, ffn_mult: int = 2, dropout: float = 0.0):
    """A VisualBERT (``layers`` joint blocks) or ViLBERT (``single_layers`` text-only and vision-only
    blocks, then ``layers`` co-attention blocks) that embeds its own pixels."""
    from .models.fusion import ViLBERT, ViLBERTConfig, VisualBERT, VisualBERTConfig

    n_visual = (image_size // patch_size) ** 2
    visual_dim = stem_width if image_stem == "conv" else 3 * patch_size ** 2
    common = dict(answers=tuple(answers), num_answers=len(answers), image_size=image_size, image_stem=image_stem,
                  patch_size=patch_size, vocab_size=vocab_size, max_text_len=max_text_len, max_visual=n_visual,
                  visual_dim=visual_dim, n_embd=width, n_head=heads, intermediate_size=ffn_mult * width,
                  dropout=dropout)
    if arch == "visualbert":
        return VisualBERT(VisualBERTConfig(name="visualbert-vqa", n_layer=layers, **common))
    if arch == "vilbert":
        return ViLBERT(ViLBERTConfig(name="vilbert-vqa", n_layer=single_layers, v_embd=width, v_layer=single_layers,
                                     v_head=heads, v_intermediate_size=ffn_mult * width, n_co_layer=layers,
                                     bi_dim=width, **common))
    raise ValueError(f"arch must be 'visualbert' or 'vilbert', got {arch!r}")


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a train-vqa run folder (its best checkpoint is ``model/``)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a polymodal checkpoint or train-vqa run folder)")
    return path


def load_vqa_model(path: str | Path):
    """(model, tokenizer, family) of a VisualBERT / ViLBERT / generative VLM checkpoint."""
    from .io import read_json
    from .models.registry import load_model
    from .tokenizers import Tokenizer

    path = resolve_model_dir(path)
    family = read_json(path / "config.json").get("family")
    if family not in ("visualbert", "vilbert", "vlm"):
        raise ValueError(f"{path}: a {family!r} checkpoint cannot answer questions (need visualbert, vilbert or vlm)")
    model = load_model(path)
    if family != "vlm" and (not model.config.answers or model.config.image_size <= 0):
        raise ValueError(f"{path}: this {family} checkpoint has no answer list or pixel front end "
                         "(train it with 'polymodal train-vqa')")
    return model, Tokenizer.load(path), family


def _plot(records: list[dict], baseline: float | None, path: Path) -> None:
    """Training loss and validation accuracy against step (matplotlib Agg, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], 100 * r["val_accuracy"]) for r in records if "val_accuracy" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    if tr:
        a1.plot(*zip(*tr), lw=1)
    a1.set(xlabel="step", ylabel="training loss", yscale="log")
    if va:
        a2.plot(*zip(*va), "o-", ms=3, label="model")
    if baseline is not None:
        a2.axhline(100 * baseline, color="gray", ls="--", label="most frequent answer")
    a2.set(xlabel="step", ylabel="val accuracy (%)")
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def train_vqa(data: str = "../shared/data/easy_vqa", out: str = "runs/vqa",
              arch: Literal["visualbert", "vilbert"] = "visualbert", val_data: str | None = None,
              image_root: str | None = None, minutes: float = 0.0, max_steps: int = 3000, batch_size: int = 128,
              lr: float = 1e-3, min_lr_ratio: float = 0.05, warmup: int = 200, weight_decay: float = 0.05,
              image_size: int = 64, patch_size: int = 16, image_stem: Literal["conv", "patches"] = "conv",
              stem_width: int = 128, width: int = 128, layers: int = 3, single_layers: int = 1, heads: int = 4,
              dropout: float = 0.0, flip: bool = False, min_answer_count: int = 1, eval_every: int = 200,
              max_train: int = 0, max_val: int = 0, seed: int = 0, threads: int = 0, progress: bool = True) -> dict:
    """Train VisualBERT or ViLBERT from scratch for VQA as answer classification (easy-VQA, DAQUAR, VQAv2).

    Args:
        data: an easy-VQA or DAQUAR folder, or a VQAv2 questions .json (annotations beside it).
        out: run folder: model/ (best checkpoint + tokenizer), metrics.jsonl, curves.png, val_predictions.jsonl, summary.json.
        arch: visualbert (one stream) or vilbert (two streams + co-attention).
        val_data: validation set (default: the folder's val split; needed for a VQAv2 JSON).
        image_root: COCO image folder for VQAv2 JSON.
        minutes: wall-clock training budget (0 = run max_steps); the cosine schedule ends with it.
        max_steps: optimizer steps at most.
        batch_size: questions per step (whole images are added until it is reached).
        lr: peak AdamW learning rate after the linear warm-up.
        min_lr_ratio: the cosine ends at lr * this.
        warmup: warm-up steps.
        weight_decay: AdamW decoupled weight decay of the weight matrices (not norms, biases, embeddings).
        image_size: square input resolution (easy-VQA images are 64x64 shapes).
        patch_size: pixels per visual token side (the conv stem's total stride).
        image_stem: conv (small ResNet stem) or patches (flattened raw pixel patches).
        stem_width: channels of the conv stem's last stage (the visual feature size).
        width: hidden size of the transformer (both ViLBERT streams).
        layers: VisualBERT blocks, or ViLBERT co-attention blocks.
        single_layers: ViLBERT text-only and vision-only blocks before the co-attention.
        heads: attention heads.
        dropout: dropout in the transformer blocks.
        flip: random horizontal/vertical flips (only for data without left/right questions, like easy-VQA).
        min_answer_count: keep answers given at least this often (rarer ones are dropped from training).
        eval_every: steps between validation evaluations (the best one is kept as model/).
        max_train: use only the first N training questions (0 = all).
        max_val: evaluate on the first N validation questions (0 = all).
        seed: seed of the initialisation, the image order and the flips.
        threads: torch CPU threads (0 = torch's default).
        progress: show a tqdm bar and the validation lines.
    """
    from tqdm import tqdm

    from .data.images import ImageProcessor
    from .data.vqa import answer_space, load_vqa
    from .eval.vqa import evaluate_vqa
    from .io import atomic_write_text
    from .models.fusion import vqa_loss
    from .models.registry import save_model
    from .train.optim import make_adamw
    from .train.schedule import lr_at

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train = load_vqa(data, "train", image_root)[:max_train or None]
    if val_data is None and Path(data).is_dir():
        val_data = data
    val = load_vqa(val_data, "val", image_root)[:max_val or None] if val_data else []
    answers = answer_space(train, min_answer_count)
    single = all(len(e.answers) == 1 for e in train)
    index = {a: i for i, a in enumerate(answers)}
    targets = _targets(train, index, single)
    keep = [i for i, t in enumerate(targets) if (t >= 0 if single else t)]
    if not keep:
        raise ValueError(f"{data}: no training question has an answer in the vocabulary")
    tok = build_question_tokenizer([e.question for e in train])
    max_len = min(64, max(len(encode_question(tok, e.question, 10 ** 6)) for e in train) + 8)
    model = build_fusion(arch, answers, tok.vocab_size, max_len, image_size, patch_size, image_stem, stem_width,
                         width, layers, single_layers, heads, dropout=dropout)
    proc = ImageProcessor.from_config(model.config)
    cache = PixelCache(proc, [e.image for e in train] + [e.image for e in val], progress)
    tokens = [encode_question(tok, e.question, max_len) for e in train]
    by_image: dict[int, list[int]] = {}
    for i in keep:
        by_image.setdefault(cache.index[train[i].image], []).append(i)
    images = list(by_image)
    baseline_answer, baseline = majority_baseline(train, val) if val else (answers[0], None)

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"
    metrics_path.write_text("")
    records: list[dict] = []

    def log(rec: dict) -> None:
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    opt = make_adamw(model, lr, weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    best = {"val_accuracy": -1.0, "step": 0}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train-vqa {arch}: {n_params / 1e6:.2f}M parameters, {len(keep)} training questions on {len(images)} "
          f"images, {len(answers)} answers, {len(val)} val questions; most-frequent-answer baseline "
          f"{baseline_answer!r}" + (f" = {100 * baseline:.2f}%" if baseline is not None else ""))

    def evaluate(step: int) -> float | None:
        if not val:
            return None
        preds = predict_fusion(model, tok, cache, val)
        acc = evaluate_vqa([p[0][0] for p in preds], gold(val))["accuracy"]
        log({"step": step, "val_accuracy": round(acc, 5), "seconds": round(time.perf_counter() - start, 1)})
        if acc > best["val_accuracy"]:
            best.update(val_accuracy=acc, step=step)
            save_model(model, run / "model", tok)
            with open(run / ".val_predictions.jsonl.tmp", "w") as f:
                for e, p in zip(val, preds):
                    f.write(json.dumps({"qid": e.qid, "image": str(e.image), "question": e.question,
                                        "prediction": p[0][0], "probability": p[0][1], "answers": e.answers}) + "\n")
            (run / ".val_predictions.jsonl.tmp").replace(run / "val_predictions.jsonl")
        if progress:
            tqdm.write(f"step {step}: val accuracy {100 * acc:.2f}% (best {100 * best['val_accuracy']:.2f}%, "
                       f"baseline {100 * baseline:.2f}%)")
        return acc

    start = time.perf_counter()
    budget = 60.0 * minutes
    decay_steps = max_steps
    step, order, pos, last_loss = 0, [], 0, None
    bar = tqdm(total=max_steps, disable=not progress, desc=f"train-vqa {arch}", dynamic_ncols=True)
    model.train()
    while step < max_steps and not (budget and time.perf_counter() - start > budget):
        batch_rows: list[int] = []
        while len(batch_rows) < min(batch_size, len(keep)):
            if pos >= len(order):  # epoch boundary: reshuffle the images
                order, pos = [images[j] for j in torch.randperm(len(images), generator=gen).tolist()], 0
            batch_rows += by_image[order[pos]]
            pos += 1
        if budget and step >= 20:  # fit the cosine to the time left, from the measured step time
            per_step = (time.perf_counter() - start) / step
            decay_steps = max(warmup + 1, min(max_steps, int(budget / per_step)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, warmup=warmup, decay_steps=decay_steps, min_lr=lr * min_lr_ratio)
        logits = _logits(model, [tokens[i] for i in batch_rows], [cache.index[train[i].image] for i in batch_rows],
                         cache, tok.pad_id, gen, flip)
        loss = vqa_loss(logits, _target_tensor([targets[i] for i in batch_rows], len(answers), single))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        last_loss = loss.item()
        if not math.isfinite(last_loss):
            raise RuntimeError(f"train-vqa: loss became {last_loss} at step {step}; lower --lr")
        if step % 10 == 0 or step == 1:
            log({"step": step, "loss": round(last_loss, 5), "lr": opt.param_groups[0]["lr"]})
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}")
        if eval_every and step % eval_every == 0:
            evaluate(step)
    bar.close()
    seconds = time.perf_counter() - start
    if not records or records[-1].get("step") != step or "val_accuracy" not in records[-1]:
        evaluate(step)
    if not val:
        save_model(model, run / "model", tok)
    _plot(records, baseline, run / "curves.png")
    summary = {"arch": arch, "data": str(data), "params": n_params, "steps": step,
               "train_seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
               "threads": torch.get_num_threads(), "n_train": len(keep), "n_val": len(val),
               "n_answers": len(answers), "final_loss": last_loss,
               "val_accuracy": best["val_accuracy"] if val else None, "best_step": best["step"] if val else None,
               "baseline_answer": baseline_answer, "baseline_accuracy": baseline, "out": str(run / "model"),
               "config": model.config.to_dict()}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))
    if val:
        print(f"best val accuracy {100 * best['val_accuracy']:.2f}% at step {best['step']} "
              f"(most-frequent-answer baseline {100 * baseline:.2f}%); checkpoint {run / 'model'}")
    return summary


def _answer_vlm(model, tokenizer, image: str | Path, question: str, max_new_tokens: int = 16) -> str:
    from .vlm_commands import answer_question  # the generative side; imported only when needed

    return answer_question(model, tokenizer, image, question, max_new_tokens=max_new_tokens)


def vqa(model: str, image: str, question: str, top_k: int = 5, max_new_tokens: int = 16) -> dict:
    """Answer a question about an image with a VisualBERT/ViLBERT or generative VLM checkpoint.

    Args:
        model: a checkpoint folder (or a train-vqa run folder).
        image: the image file.
        question: the question, e.g. "what color is the shape?".
        top_k: answers to list with their probabilities (VisualBERT / ViLBERT).
        max_new_tokens: answer length limit (generative VLM).
    """
    from .data.images import ImageProcessor

    net, tok, family = load_vqa_model(model)
    if family == "vlm":
        text = _answer_vlm(net, tok, image, question, max_new_tokens)
        print(text)
        return {"answer": text, "family": family}
    ex = VQAExample(Path(image), question, [], "cli")
    cache = PixelCache(ImageProcessor.from_config(net.config), [ex.image])
    top = predict_fusion(net, tok, cache, [ex], top_k=top_k)[0]
    for a, p in top:
        print(f"{p:7.2%}  {a}")
    return {"answer": top[0][0], "top": top, "family": family}


def eval_vqa(model: str, data: str = "../shared/data/easy_vqa", split: str = "val", image_root: str | None = None,
             batch_size: int = 256, max_examples: int = 0, max_new_tokens: int = 16, predictions: str | None = None,
             json_out: str | None = None, progress: bool = True) -> dict:
    """VQA accuracy of a checkpoint (soft VQA accuracy, or exact match for single-answer sets) beside the most-frequent-answer baseline.

    Args:
        model: a VisualBERT / ViLBERT / generative VLM checkpoint folder (or a train-vqa run folder).
        data: an easy-VQA or DAQUAR folder, or a VQAv2 questions .json.
        split: the split to score (train, val).
        image_root: COCO image folder for VQAv2 JSON.
        batch_size: questions per forward pass (VisualBERT / ViLBERT).
        max_examples: score only the first N questions (0 = all).
        max_new_tokens: answer length limit (generative VLM).
        predictions: write one JSON line per question (prediction, answers, score) here.
        json_out: write the metrics here.
        progress: show tqdm bars.
    """
    from .data.images import ImageProcessor
    from .data.vqa import load_vqa
    from .eval.vqa import evaluate_vqa, exact_match, vqa_accuracy

    net, tok, family = load_vqa_model(model)
    examples = load_vqa(data, split, image_root)[:max_examples or None]
    if not examples:
        raise ValueError(f"{data}: split {split!r} has no questions")
    if family == "vlm":
        from .vlm_commands import answer_questions  # batched: each answer equals the one-question answer

        preds = answer_questions(net, tok, [e.image for e in examples], [e.question for e in examples],
                                 max_new_tokens=max_new_tokens, progress=progress)
    else:
        cache = PixelCache(ImageProcessor.from_config(net.config), [e.image for e in examples], progress)
        preds = [p[0][0] for p in predict_fusion(net, tok, cache, examples, batch_size)]
    refs = gold(examples)
    result = evaluate_vqa(preds, refs)
    # The baseline answer comes from training data: the train split beside the evaluated one, else
    # the fusion model's answer list (most frequent first), else (VLM, no train split) the split itself.
    train = None
    if split != "train" and Path(data).is_dir():
        try:
            train = load_vqa(data, "train", image_root)
        except FileNotFoundError:
            train = None
    if train:
        base_answer, base = majority_baseline(train, examples)
        source = "train split"
    elif family != "vlm":
        base_answer = net.config.answers[0]
        base, source = evaluate_vqa([base_answer] * len(examples), refs)["accuracy"], "model's training answers"
    else:
        base_answer, base = majority_baseline(examples, examples)
        source = "evaluated split (oracle)"
    metric = "soft VQA accuracy" if any(isinstance(r, list) for r in refs) else "exact match"
    out = {"accuracy": result["accuracy"], "n": len(examples), "metric": metric, "family": family,
           "baseline_answer": base_answer, "baseline_accuracy": base, "baseline_source": source}
    print(f"{family} on {data} [{split}]: {metric} {100 * out['accuracy']:.2f}% over {len(examples)} questions; "
          f"most-frequent answer {base_answer!r} ({source}): {100 * base:.2f}%")
    if predictions:
        with open(predictions, "w") as f:
            for e, p, r in zip(examples, preds, refs):
                s = exact_match(p, r) if isinstance(r, str) else vqa_accuracy(p, r)
                f.write(json.dumps({"qid": e.qid, "question": e.question, "prediction": p, "answers": e.answers,
                                    "score": s}) + "\n")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1))
    out["predictions"] = preds
    return out
