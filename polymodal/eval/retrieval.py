"""Image-text retrieval metrics: Recall@K in both directions, mean / median rank, MRR.

The protocol of Karpathy & Fei-Fei (2015) and CLIP (Radford et al., 2021, table 13):
with a similarity matrix ``scores[i, j]`` between image i and caption j, and each
caption belonging to one image (Flickr/COCO: 5 captions per image),

* text -> image: for caption j, rank_j = 1 + #{images scored strictly higher than
  its own image}; R@K = mean_j [rank_j <= K];
* image -> text: for image i, rank_i = 1 + #{captions of *other* images scored
  strictly higher than its best caption}; R@K = mean_i [rank_i <= K] (a hit when any
  of its captions is in the top K);
* mean rank = mean of those ranks (median rank = their median), MRR = mean 1/rank.

Ties count in the query's favour (strictly higher scores only). These equal
torchmetrics' ``RetrievalRecall`` (text -> image, one relevant image),
``RetrievalHitRate`` (image -> text, several relevant captions) and ``RetrievalMRR``
on tie-free scores (tests/test_contrastive.py checks it).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Rank (1-based) of the best relevant item of each query row: scores, relevant (Q, N)."""
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant item")
    best = scores.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    return 1 + ((scores > best) & ~relevant).sum(dim=1)


def _chance_hit(n: int, n_relevant: torch.Tensor, k: int) -> float:
    """Expected R@K of a random ranking: 1 - C(n - r, k) / C(n, k), averaged over queries."""
    k = min(k, n)
    out = []
    for r in n_relevant.tolist():
        miss = 1.0
        for t in range(k):  # prod_{t<k} (n - r - t) / (n - t)
            miss *= max(n - r - t, 0) / (n - t)
        out.append(1.0 - miss)
    return sum(out) / len(out)


def retrieval_metrics(scores: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor | None = None,
                      ks: Sequence[int] = (1, 5, 10), chance: bool = True) -> dict[str, float]:
    """Recall@K both ways, mean/median rank and MRR from an image-by-text score matrix.

    Args:
        scores: (n_images, n_texts) similarities (higher = more similar), e.g. ``logits_per_image``.
        text_to_image: the image index of each caption (length n_texts); default: caption j
            belongs to image j (a square matrix).
        ks: the cut-offs K of Recall@K.
        chance: also report a random ranking's expected R@K (``chance_t2i_R@K`` ...).

    Returns keys ``t2i_R@K``, ``i2t_R@K`` (fractions in [0, 1]), ``t2i_mean_rank``,
    ``i2t_mean_rank``, ``t2i_median_rank``, ``i2t_median_rank``, ``t2i_mrr``, ``i2t_mrr``,
    ``n_images``, ``n_texts`` (and the chance levels).
    """
    scores = torch.as_tensor(scores).detach().float().cpu()
    if scores.dim() != 2:
        raise ValueError(f"scores must be (n_images, n_texts), got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"scores are {n_img}x{n_txt}: pass text_to_image for a non-square matrix")
        owner = torch.arange(n_txt)
    else:
        owner = torch.as_tensor(list(text_to_image) if not torch.is_tensor(text_to_image) else text_to_image).long()
        if owner.shape != (n_txt,):
            raise ValueError(f"text_to_image has {owner.numel()} entries for {n_txt} texts")
        if owner.min() < 0 or owner.max() >= n_img:
            raise ValueError(f"text_to_image holds image indices outside 0..{n_img - 1}")
    relevant = owner[None, :] == torch.arange(n_img)[:, None]  # (n_images, n_texts)
    t2i = _ranks(scores.t(), relevant.t()).float()
    i2t = _ranks(scores, relevant).float()
    out: dict[str, float] = {"n_images": float(n_img), "n_texts": float(n_txt)}
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i <= k).float().mean().item()
        out[f"i2t_R@{k}"] = (i2t <= k).float().mean().item()
    for name, r in (("t2i", t2i), ("i2t", i2t)):
        out[f"{name}_mean_rank"] = r.mean().item()
        out[f"{name}_median_rank"] = r.median().item()
        out[f"{name}_mrr"] = (1.0 / r).mean().item()
    if chance:
        n_rel_i2t = relevant.sum(dim=1)
        for k in ks:
            out[f"chance_t2i_R@{k}"] = min(k, n_img) / n_img
            out[f"chance_i2t_R@{k}"] = _chance_hit(n_txt, n_rel_i2t, k)
    return out


def format_metrics(m: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> str:
    """A small table: R@K (%) per direction beside chance, then the mean ranks."""
    lines = [f"retrieval over {int(m['n_images'])} images / {int(m['n_texts'])} captions",
             f"{'':<14}" + "".join(f"{'R@' + str(k):>9}" for k in ks) + f"{'mean rank':>11}{'MRR':>8}"]
    for name, label in (("t2i", "text->image"), ("i2t", "image->text")):
        row = f"{label:<14}" + "".join(f"{100 * m[f'{name}_R@{k}']:>8.1f}%" for k in ks)
        row += f"{m[f'{name}_mean_rank']:>11.2f}{m[f'{name}_mrr']:>8.3f}"
        lines.append(row)
        if f"chance_{name}_R@{ks[0]}" in m:
            lines.append(f"{'  (chance)':<14}" + "".join(f"{100 * m[f'chance_{name}_R@{k}']:>8.1f}%" for k in ks))
    return "\n".join(lines)
