"""``polymodal classify``: the top-k ImageNet (or fine-tuned) classes of image files."""
from __future__ import annotations

import json as jsonlib


def classify_cmd(image: list[str], model: str = "efficientnet-lite0", top_k: int = 5, json: bool = False,
                 batch_size: int = 16, device: str = "auto") -> list[dict]:
    """Classifies images with a pretrained image classifier and prints the top-k labels and scores.

    Args:
        image: image file(s) to classify (repeat the flag or give several)
        model: an alias (efficientnet-lite0, efficientnet-lite1, efficientnet-lite2), a model folder or a training run
        top_k: how many classes to print per image
        json: print one JSON object per image: {"file", "top_k": [{"index", "label", "score"}]}
        batch_size: images per forward pass
        device: auto, cpu, cuda, ...
    """
    from ..inference.classify import classify_images
    from ..interop import load

    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    net = load(model, device=device).model
    results = classify_images(net, image, top_k=top_k, batch_size=batch_size)
    for r in results:
        if json:
            print(jsonlib.dumps(r))
            continue
        print(r["file"])
        for rank, t in enumerate(r["top_k"], 1):
            print(f"  {rank}. {t['label']} ({t['index']})  {100 * t['score']:.1f}%")
    return results
