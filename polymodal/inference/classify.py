"""Image classification: an image classifier's top-k classes for image files.

The images go through the preprocessing stored in the model's config
(``ImageProcessor.from_config``: resize, crop, interpolation, mean/std), then one batched
forward pass; scores are the softmax p(class | image) = exp(z_c) / sum_j exp(z_j) of the logits.
Any model with a classification head and image preprocessing in its config works: EfficientNet
(``labels()``: ImageNet names) or a ViT with ``num_labels`` (``id2label``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def class_names(model: nn.Module) -> list[str]:
    """The label of each output index: the model's ``labels()``, its config's ``id2label``, else the index."""
    c = model.config
    n = int(getattr(c, "num_labels", 0) or 0)
    names = model.labels() if hasattr(model, "labels") else None
    if names is None and getattr(c, "id2label", None):
        names = [c.id2label.get(str(i), str(i)) for i in range(n)]
    return names or [str(i) for i in range(n)]


def classify_images(model: nn.Module, images: Sequence[str | Path], top_k: int = 5,
                    batch_size: int = 16) -> list[dict]:
    """``[{"file", "top_k": [{"index", "label", "score"}, ...]}]``, one entry per image, in order.

    An image that does not decode raises ``ImageLoadError`` (a ValueError) naming the file."""
    from ..data.images import ImageProcessor, load_images

    c = model.config
    if not int(getattr(c, "num_labels", 0) or 0) or not hasattr(c, "image_size"):
        raise ValueError(f"{getattr(c, 'name', type(model).__name__)}: not an image classifier "
                         "(no classification head or no image preprocessing in its config)")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    proc, names = ImageProcessor.from_config(c), class_names(model)
    device = next(model.parameters()).device
    k = min(top_k, len(names))
    out = []
    model.eval()
    for start in range(0, len(images), batch_size):
        files = list(images[start:start + batch_size])
        pics, _ = load_images(files)
        with torch.inference_mode():
            probs = model(proc(pics).to(device)).float().softmax(dim=-1)
        scores, idx = probs.topk(k, dim=-1)
        for f, s_row, i_row in zip(files, scores.tolist(), idx.tolist()):
            out.append({"file": str(f), "top_k": [{"index": i, "label": names[i], "score": s}
                                                  for i, s in zip(i_row, s_row)]})
    return out
