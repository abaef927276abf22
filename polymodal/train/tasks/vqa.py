"""VQA as answer classification (VisualBERT / ViLBERT from scratch) as a Task.

The model scores every answer of a fixed vocabulary (the training answers, most frequent
first) from the pooled output of a fusion encoder: VisualBERT (Li et al., 2019) or ViLBERT
(Lu et al., 2019), see ``polymodal.models.fusion`` (Antol et al., 2015, sec. 5; Teney et al.,
2018, "Tips and Tricks for Visual Question Answering", sec. 3). Objective per question q:

* one answer per question (easy-VQA, DAQUAR): cross-entropy, L_q = -log softmax(s_q)[a_q];
* several human answers (VQAv2): binary cross-entropy against the soft scores
  t_qa = min(#humans who said a / 3, 1), summed over the answers (Teney et al., eq. 1).

Batches are built image by image: a step takes ``images_per_step`` images (an
:class:`EpochSampler` over images) and all their questions, so the pixel stem runs once per
image rather than once per question (easy-VQA has ~10 questions per image). The question
count of a step varies, so each rank divides its loss sum by (questions in the global batch /
world): the mean over ranks is then exactly the mean over the global batch's questions.
Optional flips (easy-VQA: its questions never say left or right) come from a generator seeded
by the micro-batch index.

The metric is VQA accuracy on the val split (``polymodal.eval.vqa.evaluate_vqa``: soft VQA
accuracy for multi-answer sets, exact match of the normalised strings otherwise), mode max;
``summary`` gives the most-frequent-answer baseline beside it.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import EpochSampler, Task, shard


def soft_targets(examples, index: dict[str, int], single: bool) -> list:
    """Class ids (-1 when the answer is not in the vocabulary), or {answer id: min(n/3, 1)} rows."""
    from ...eval.vqa import normalize_answer, soft_score

    if single:
        return [index.get(normalize_answer(e.answers[0]), -1) for e in examples]
    out = []
    for e in examples:
        counts = Counter(normalize_answer(a) for a in e.answers)
        out.append({index[a]: soft_score(n) for a, n in counts.items() if a in index})
    return out


class VQATask(Task):
    name, metric, mode, unit = "vqa", "accuracy", "max", "q"

    def __init__(self, data: str | Path, arch: str = "visualbert", val_data: str | None = None,
                 image_root: str | None = None, batch_size: int = 128, image_size: int = 64, patch_size: int = 16,
                 image_stem: str = "conv", stem_width: int = 128, width: int = 128, layers: int = 3,
                 single_layers: int = 1, heads: int = 4, dropout: float = 0.0, flip: bool = False,
                 min_answer_count: int = 1, max_train: int = 0, max_val: int = 0, eval_batch_size: int = 256,
                 seed: int = 0, progress: bool = True):
        from ...data.image_cache import PixelCache
        from ...data.images import ImageProcessor
        from ...data.vqa import answer_space, load_vqa
        from ...eval.vqa import majority_baseline
        from ...models.fusion import fusion_config
        from ...tokenizers.question import encode_question, train_question_tokenizer

        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        train = load_vqa(data, "train", image_root)[:max_train or None]
        if val_data is None:
            if not Path(data).is_dir():
                raise ValueError(f"{data}: a questions .json has no val split beside it; pass --val-data")
            val_data = data
        self.val = load_vqa(val_data, "val", image_root)[:max_val or None]
        self.answers = answer_space(train, min_answer_count)
        self.single = all(len(e.answers) == 1 for e in train)
        self.targets = soft_targets(train, {a: i for i, a in enumerate(self.answers)}, self.single)
        keep = [i for i, t in enumerate(self.targets) if (t >= 0 if self.single else t)]
        if not keep:
            raise ValueError(f"{data}: no training question has an answer given --min-answer-count "
                             f"{min_answer_count} times")
        self.tokenizer = train_question_tokenizer([e.question for e in train])
        max_len = min(64, max(len(encode_question(self.tokenizer, e.question, 10 ** 6)) for e in train) + 8)
        self.config = fusion_config(arch, self.answers, self.tokenizer.vocab_size, max_len, image_size, patch_size,
                                    image_stem, stem_width, width, layers, single_layers, heads, dropout=dropout)
        self.cache = PixelCache(ImageProcessor.from_config(self.config),
                                [e.image for e in train] + [e.image for e in self.val], progress, "decode images")
        self.tokens = [encode_question(self.tokenizer, e.question, max_len) for e in train]
        self.by_image: dict[int, list[int]] = {}
        for i in keep:
            self.by_image.setdefault(self.cache.index[train[i].image], []).append(i)
        self.images = list(self.by_image)
        self.images_per_step = min(len(self.images), max(1, round(batch_size * len(self.images) / len(keep))))
        self.sampler = EpochSampler(len(self.images), self.images_per_step, seed)
        self.flip, self.seed, self.eval_batch_size, self.batch_size = flip, seed, eval_batch_size, batch_size
        self.n_train = len(keep)
        self.baseline = majority_baseline(train, self.val)
        self._preds: list | None = None

    def build_model(self) -> nn.Module:
        from ...models.registry import build_model

        model = build_model(self.config)
        for p in model.itm_head.parameters():  # VQA never trains image-text matching: keep DDP's
            p.requires_grad_(False)            # every-trainable-parameter-gets-a-gradient rule
        return model

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, Any]:
        from ...data.image_cache import generator
        from ...eval.vqa import pad_rows

        if self.images_per_step % world:
            raise ValueError(f"{self.images_per_step} images per step (--batch-size {self.batch_size} over "
                             f"{self.n_train / len(self.images):.1f} questions per image) do not split over {world} "
                             f"ranks; choose a --batch-size that gives a multiple of {world}")
        rows = [self.images[p] for p in self.sampler.indices(index)]
        flips = torch.rand(2, len(rows), generator=generator(self.seed, index)) < 0.5 if self.flip else None
        questions = [q for r in rows for q in self.by_image[r]]
        longest = max(len(self.tokens[q]) for q in questions)  # the global batch's, on every rank
        mine = shard(list(range(len(rows))), rank, world)
        owner = [(j, q) for j, k in enumerate(mine) for q in self.by_image[rows[k]]]
        ids, mask = pad_rows([self.tokens[q] for _, q in owner], self.tokenizer.pad_id, longest)
        if self.single:
            targets = torch.tensor([self.targets[q] for _, q in owner], dtype=torch.long)
        else:
            targets = torch.zeros(len(owner), len(self.answers))
            for r, (_, q) in enumerate(owner):
                for a, s in self.targets[q].items():
                    targets[r, a] = s
        return {"input_ids": ids, "attention_mask": mask, "targets": targets,
                "pixel_values": self.cache.pixels([rows[k] for k in mine], None if flips is None else flips[:, mine]),
                "image_index": torch.tensor([j for j, _ in owner], dtype=torch.long),
                "scale": world / len(questions)}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        from ...models.fusion import vqa_loss

        # through the (possibly DDP-wrapped) module's forward, so gradient sync hooks run
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_index=batch["image_index"])["vqa"]
        return {"loss": vqa_loss(logits, batch["targets"], reduction="sum") * batch["scale"]}

    def count(self, batch) -> int:
        return int(batch["input_ids"].shape[0])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """VQA accuracy over the whole val split (its top-1 answers are kept for ``export``)."""
        from ...eval.vqa import evaluate_vqa, gold, predict_fusion

        self._preds = predict_fusion(model, self.tokenizer, self.cache, self.val, self.eval_batch_size)
        return {"accuracy": evaluate_vqa([p[0][0] for p in self._preds], gold(self.val))["accuracy"]}

    def export(self, model, folder) -> Path:
        """The model with its tokenizer, and the val predictions of the evaluation that chose it
        (``val_predictions.jsonl`` beside the model folder)."""
        from ...io import atomic_write_text
        from ...models.registry import save_model

        path = save_model(model, folder, tokenizer=self.tokenizer)
        if self._preds is not None:
            lines = [json.dumps({"qid": e.qid, "image": str(e.image), "question": e.question, "prediction": p[0][0],
                                 "probability": p[0][1], "answers": e.answers}) for e, p in zip(self.val, self._preds)]
            atomic_write_text(Path(folder).parent / "val_predictions.jsonl", "".join(x + "\n" for x in lines))
        return path

    def summary(self) -> dict[str, Any]:
        return {"arch": self.config.family, "n_train": self.n_train, "n_images": len(self.images),
                "images_per_step": self.images_per_step, "n_answers": len(self.answers), "n_val": len(self.val),
                "baseline_answer": self.baseline[0], "baseline_accuracy": self.baseline[1],
                "scoring": "exact match" if self.single else "soft VQA accuracy"}
