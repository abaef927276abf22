"""Evaluating a dual encoder: zero-shot classification, retrieval scores, top-k search.

* Zero-shot classification (Radford et al., 2021, CLIP sec. 3.1.4): each class's weight is the
  renormalised mean of its normalised prompt embeddings over the templates ("prompt ensembling",
  in embedding space, sec. 3.1.4), and an image's class is the argmax cosine with those weights.
* Retrieval: the image-by-caption cosine matrix of a caption set, the input of
  :func:`polymodal.eval.retrieval.retrieval_metrics` (R@K both ways, mean rank, MRR).
* Search: the top-k gallery images of text queries, or the top-k captions of image queries.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.dual_encoder import encode_images, encode_texts

# CLIP's CIFAR-10 prompt templates (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, CIFAR list).
DEFAULT_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a low contrast photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


def zero_shot_weights(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(n_classes, D) classifier: per class, the renormalised mean of its normalised prompt
    embeddings over the templates (CLIP's prompt ensembling, in embedding space)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a '{}' placeholder for the class name")
    weights = []
    for name in classnames:
        e = encode_texts(model, tokenizer, [t.format(name) for t in templates])
        weights.append(F.normalize(e.mean(dim=0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_probs(model, tokenizer, processor, images: Sequence, classnames: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64) -> torch.Tensor:
    """(n_images, n_classes) softmax over exp(t) * cosine(image, class weight)."""
    w = zero_shot_weights(model, tokenizer, classnames, templates)
    scale = model.logit_scale.exp().item()
    return (scale * encode_images(model, processor, images, batch_size) @ w.t()).softmax(dim=-1)


def dataset_scores(model, tokenizer, dataset, pixels: torch.Tensor | None = None, batch_size: int = 64,
                   image_embeds: torch.Tensor | None = None,
                   text_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """(scores (n_images, n_texts), the image index of each caption) of a ``CaptionDataset``:
    cosines between every image (eval preprocessing, or ``pixels`` given) and every caption.
    ``image_embeds`` / ``text_embeds``: normalised embeddings computed beforehand (a locked tower's)."""
    img = image_embeds if image_embeds is not None else encode_images(
        model, dataset.processor, pixels if pixels is not None else dataset.images, batch_size)
    texts, owner = dataset.all_texts()
    txt = text_embeds if text_embeds is not None else encode_texts(model, tokenizer, texts)
    return img @ txt.t(), owner


def retrieval_on(model, tokenizer, dataset, pixels: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways, mean / median rank, MRR and chance levels on a caption dataset, plus
    ``mean_recall``: the mean of the six recalls (one number to select checkpoints by)."""
    from .retrieval import retrieval_metrics

    m = retrieval_metrics(*dataset_scores(model, tokenizer, dataset, pixels, image_embeds=image_embeds,
                                          text_embeds=text_embeds))
    m["mean_recall"] = sum(m[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)) / 6
    return m


def top_k(scores: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Indices and scores of each row's k best columns (best first)."""
    top = scores.topk(min(k, scores.shape[1]), dim=-1)
    return top.indices.tolist(), top.values.tolist()


def search_images(model, tokenizer, processor, queries: Sequence[str], gallery: Sequence, k: int = 5):
    """For each text query, the top-k gallery images: (indices, scores)."""
    return top_k(encode_texts(model, tokenizer, list(queries)) @ encode_images(model, processor, gallery).t(), k)


def search_texts(model, tokenizer, processor, queries: Sequence, texts: Sequence[str], k: int = 5):
    """For each query image, the top-k candidate captions: (indices, scores)."""
    return top_k(encode_images(model, processor, queries) @ encode_texts(model, tokenizer, list(texts)).t(), k)
